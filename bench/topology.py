"""The seed's Qwen3-30B-A3B topology at a size that fits a test machine (issue: 8-GPU run).

`topology_config` keeps every width of Qwen3-30B-A3B (hidden 2048, 32 heads in 4 KV groups of
head_dim 128, 128 experts top-8 of hidden 768), so the tensor- and expert-parallel layout is the
real one, and cuts the depth (48 layers to 8 by default) and the vocabulary (to the built-in
task's tokenizer, padded to a multiple of 128 as Megatron pads it: tokens the tokenizer lacks
decode to nothing). About 5B parameters at 8 layers, 0.6B active per token.

`python bench/topology.py DIR [--layers N]` writes it as a Hugging Face directory (random bf16
weights, the built-in tokenizer), which `driver.py --model.hf_checkpoint DIR` trains on the
built-in task; `bench/bench_megatron.py --model topology` times the same shape.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.reference import qwen3_30b_a3b_config
from models.tiny import BOS, EOS, PAD, VOCAB, build_tokenizer

VOCAB_MULTIPLE = 128  # Megatron's --make-vocab-size-divisible-by default
SEED = 7


def topology_config(layers: int = 8) -> Qwen3MoeConfig:
    vocab_size = -(-len(VOCAB) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return qwen3_30b_a3b_config(
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        pad_token_id=VOCAB.index(PAD),
        eos_token_id=VOCAB.index(EOS),
        bos_token_id=VOCAB.index(BOS),
    )


def write_model(directory: Path, layers: int) -> None:
    """Random bf16 weights (norms 1, the rest N(0, 0.02)) and the built-in tokenizer, written
    to a staging directory and renamed, so a half-written model is never left at `directory`."""
    from models.checkpoint_format import checkpoint_tensors
    from models.safetensors_io import write_sharded

    config = topology_config(layers)
    with torch.device("meta"):
        shapes = [(n, t.shape) for n, t in checkpoint_tensors(Qwen3MoeForCausalLM(config))]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device).manual_seed(SEED)

    def tensors():
        for name, shape in shapes:
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape, dtype=torch.bfloat16)
            else:
                weight = torch.randn(shape, device=device, generator=generator) * 0.02
                yield name, weight.to(torch.bfloat16).cpu()

    with tempfile.TemporaryDirectory() as staging:
        config.save_pretrained(staging)
        build_tokenizer().save_pretrained(staging)
        extra = sorted(p for p in Path(staging).iterdir() if p.is_file())
        write_sharded(directory, tensors(), extra_files=extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="where the Hugging Face model is written")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    args = parser.parse_args()
    if args.layers < 1:
        parser.error(f"--layers {args.layers}: must be >= 1")
    write_model(args.directory, args.layers)
    print(f"wrote {args.directory} ({args.layers} layers)")


if __name__ == "__main__":
    main()
