"""Convert a Hugging Face checkpoint into a Megatron torch_dist checkpoint.

    torchrun --nproc-per-node 8 tools/convert_hf_to_torch_dist.py \\
        --hf-checkpoint /root/Qwen3-30B-A3B --save /root/Qwen3-30B-A3B_torch_dist \\
        [--tensor-model-parallel-size T --expert-model-parallel-size E ...] [MODEL_ARGS...]

The model is built from the checkpoint's config.json; the seed's MODEL_ARGS (for example
`--num-layers 48 --hidden-size 2048 --moe-grouped-gemm`) may be passed too and are checked
against it, flag by flag. Each rank reads only its shards of the safetensors. The layout the
conversion runs at does not bind training: a torch_dist checkpoint loads under any parallel
layout. `--save` is a torch_dist checkpoint directory, written to `<save>.tmp` and renamed
when complete; nothing else (config, tokenizer) is copied into it.
"""

import argparse
import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

from config.errors import UserError
from models.safetensors_io import SafetensorsReader, replace_directory, sibling
from tools.conversion import (
    add_parallel_flags,
    build_model,
    is_main_rank,
    model_dtype,
    parallel_config,
    read_hf_config,
    run,
    start_distributed,
    world_size,
)
from training.megatron.model_config import ModelShape, model_args, model_shape
from training.megatron.parallel import check_layout

CONDITIONAL_FLAGS = (
    "--untie-embeddings-and-output-weights",
    "--moe-router-pre-softmax",
    "--moe-ffn-hidden-size",
    "--moe-router-score-function",
    "--moe-token-dispatcher-type",
    "--moe-router-topk",
    "--moe-layer-freq",
    "--num-experts",
    "--moe-grouped-gemm",
    "--moe-token-drop-policy",
    "--moe-router-dtype",
    "--moe-permute-fusion",
    "--moe-aux-loss-coeff",
)
"""MODEL_ARGS flags `model_args` writes only for some configs (tied embeddings, MoE): known,
but wrong for a config that does not produce them."""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The tool's own flags, and the remaining tokens (the MODEL_ARGS)."""
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--hf-checkpoint", required=True, help="Hugging Face model directory")
    parser.add_argument("--save", required=True, help="torch_dist checkpoint directory to write")
    add_parallel_flags(parser)
    return parser.parse_known_args(argv)


def flag_values(tokens: list[str], source: str) -> dict[str, str | None]:
    """`--flag value` / `--flag=value` / `--switch` tokens -> {flag: value or None}."""
    flags: dict[str, str | None] = {}
    flag = None
    for token in tokens:
        if token.startswith("--"):
            flag, _, value = token.partition("=")
            flags[flag] = value or None
        elif flag is None or flags[flag] is not None:
            raise UserError(f"{source}: {token!r} follows no flag")
        else:
            flags[flag] = token
    return flags


def check_model_args(tokens: list[str], hf, source: str) -> None:
    """Every given MODEL_ARGS flag must be one Megatron-LM knows and agree with config.json."""
    expected = flag_values(model_args(hf), "config")
    known = set(expected) | set(CONDITIONAL_FLAGS)
    given = flag_values(tokens, "MODEL_ARGS")
    unknown = [flag for flag in given if flag not in known]
    if unknown:
        raise UserError(
            f"unknown flag(s) {', '.join(unknown)}; the MODEL_ARGS flags this tool checks "
            f"are: {', '.join(sorted(known))}"
        )
    shape = model_shape(hf)
    problems = [
        _disagreement(flag, value, expected, shape, source)
        for flag, value in given.items()
        if not _agrees(flag, value, expected, shape)
    ]
    if problems:
        raise UserError("MODEL_ARGS disagree with the checkpoint: " + "; ".join(problems))


def _agrees(flag: str, value: str | None, expected: dict, shape: ModelShape) -> bool:
    if flag not in expected:
        return False
    want = expected[flag]
    if value is None or want is None:
        return value == want
    if flag == "--moe-layer-freq":
        return _layer_pattern(value, shape.num_layers) == _layer_pattern(want, shape.num_layers)
    try:
        return float(value) == float(want)
    except ValueError:
        return value == want


def _disagreement(flag, value, expected: dict, shape: ModelShape, source: str) -> str:
    given = f"{flag} {value}" if value is not None else flag
    if flag not in expected:
        return f"{given} is given, but {source}/config.json gives no {flag}"
    want = expected[flag] if expected[flag] is not None else "(a switch, no value)"
    return f"{given} is given, but {source}/config.json gives {flag} {want}"


def _layer_pattern(text: str, num_layers: int) -> list[int]:
    """Megatron-LM's --moe-layer-freq: N (every Nth layer is MoE) or a list expression such
    as `([1]*3+[0])*12`, possibly still in the seed script's extra quotes."""
    text = text.strip().strip("'\"")
    if text.isdigit():
        return [int(i % int(text) == 0) for i in range(num_layers)]
    try:
        return _list_value(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError):
        raise UserError(
            f"--moe-layer-freq {text!r}: expected N or a list expression like ([1]*3+[0])*12"
        ) from None


def _list_value(node: ast.AST):
    # A tiny evaluator (ints, lists, + and *) instead of eval() on command-line text.
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.List | ast.Tuple):
        return [_list_value(element) for element in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mult):
        left, right = _list_value(node.left), _list_value(node.right)
        return left + right if isinstance(node.op, ast.Add) else left * right
    raise ValueError(ast.dump(node))


def check_weights(reader: SafetensorsReader, shape: ModelShape, expert: int, dtype) -> None:
    """Every tensor the model needs is in the checkpoint (checked before any rank starts)."""
    from training.megatron.hf_weights import hf_weight_specs

    present = set(reader.names())
    missing = [s.name for s in hf_weight_specs(shape, expert, dtype) if s.name not in present]
    if missing:
        raise UserError(
            f"{reader.directory} lacks {len(missing)} tensor(s) its config.json implies, "
            f"e.g. {', '.join(missing[:3])}"
        )


def main(argv: list[str]) -> None:
    args, extra = parse_args(argv)
    hf = read_hf_config(args.hf_checkpoint)
    check_model_args(extra, hf, args.hf_checkpoint)
    parallel, shape = parallel_config(args), model_shape(hf)
    check_layout(parallel, world_size(), shape)
    reader = SafetensorsReader(args.hf_checkpoint)
    check_weights(reader, shape, parallel.expert, model_dtype(hf))
    convert(reader, hf, parallel, shape, Path(args.save))


def convert(reader: SafetensorsReader, hf, parallel, shape: ModelShape, save: Path) -> None:
    """Build the model on every rank, fill it from the safetensors, save it (collective)."""
    import torch.distributed as dist

    from training.megatron.checkpoint import STAGING_SUFFIX, save_torch_dist
    from training.megatron.hf_weights import load_hf_weights

    model = build_model(hf, parallel, start_distributed())
    load_hf_weights(model, reader.read, shape, model.config)
    staging = sibling(save, STAGING_SUFFIX)
    save_torch_dist(staging, model)
    if is_main_rank():
        replace_directory(staging, save)
        layout = f"TP{parallel.tensor} PP{parallel.pipeline} EP{parallel.expert}"
        print(f"saved {reader.directory} as a torch_dist checkpoint in {save} ({layout})")
    dist.barrier()


if __name__ == "__main__":
    run(main)
