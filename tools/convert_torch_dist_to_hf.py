"""Convert a Megatron torch_dist checkpoint back into a Hugging Face model directory.

    python tools/convert_torch_dist_to_hf.py --load CKPT --hf-config HF_DIR --save OUT_DIR
    torchrun --nproc-per-node 8 tools/convert_torch_dist_to_hf.py ... \\
        --tensor-model-parallel-size 2 --expert-model-parallel-size 4

`--load` is a checkpoint directory (the other converter's output) or a training run's save
root, whose latest checkpoint is taken. The model is built from `--hf-config`'s config.json
(the original Hugging Face directory); the checkpoint loads whatever layout it was saved at.
Rank 0 writes safetensors shards under Hugging Face names, plus config.json,
generation_config.json and the tokenizer files copied from `--hf-config`, into `<save>.tmp`,
renamed to `--save` when complete; `AutoModelForCausalLM.from_pretrained` loads the result.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

from config.errors import UserError
from models.safetensors_io import write_sharded
from tools.conversion import (
    add_parallel_flags,
    build_model,
    is_main_rank,
    parallel_config,
    read_hf_config,
    run,
    start_distributed,
    world_size,
)
from training.megatron.checkpoint import latest
from training.megatron.model_config import model_shape
from training.megatron.parallel import check_layout

SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
"""Files copied from `--hf-config` when present: what from_pretrained needs besides weights."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--load", required=True, help="torch_dist checkpoint or save root")
    parser.add_argument("--hf-config", required=True, help="Hugging Face directory of the model")
    parser.add_argument("--save", required=True, help="Hugging Face directory to write")
    parser.add_argument(
        "--max-shard-gib", type=float, default=4.0, help="largest safetensors shard [4]"
    )
    add_parallel_flags(parser)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    hf = read_hf_config(args.hf_config)
    parallel, shape = parallel_config(args), model_shape(hf)
    check_layout(parallel, world_size(), shape)
    checkpoint = latest(args.load)
    if checkpoint is None:
        raise UserError(f"--load {args.load}: no torch_dist checkpoint there")
    side_files = [Path(args.hf_config, n) for n in SIDE_FILES if Path(args.hf_config, n).is_file()]
    export(checkpoint, hf, parallel, shape, args, side_files)


def export(checkpoint: Path, hf, parallel, shape, args, side_files: list[Path]) -> None:
    """Load the checkpoint on every rank; gather full tensors; rank 0 writes them."""
    import torch.distributed as dist

    from training.megatron.checkpoint import load_torch_dist
    from training.megatron.hf_weights import export_hf_weights
    from weights.runs import pairs

    model = build_model(hf, parallel, start_distributed())
    load_torch_dist(checkpoint, model)
    tensors = pairs(export_hf_weights(model, shape, model.config))
    if is_main_rank():
        limit = int(args.max_shard_gib * (1 << 30))
        write_sharded(args.save, tensors, limit, extra_files=side_files)
        print(f"saved Hugging Face weights of {checkpoint} to {args.save}")
    else:
        for _ in tensors:  # the export is a collective: every rank takes part
            pass
    dist.barrier()


if __name__ == "__main__":
    run(main)
