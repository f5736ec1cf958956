"""Convert a bf16 Hugging Face checkpoint into a block-FP8 rollout checkpoint.

    python tools/convert_hf_to_fp8.py --hf-checkpoint /root/Qwen3-30B-A3B \\
        --save /root/Qwen3-30B-A3B-FP8 [--weight-block-size 128 128] \\
        [--modules-to-not-convert model.layers.0.self_attn ...] [--device cuda]

The layout is that of the published Qwen3 FP8 checkpoints: every Linear projection weight of
attention and of the MLP / experts (q/k/v/o_proj, gate/up/down_proj) in torch.float8_e4m3fn,
quantized in blocks (128 x 128 by default; partial edge blocks allowed) with its fp32 block
scales beside it as `<name>_scale_inv` (amax / 448: what multiplies the fp8 values back);
embeddings, lm_head, norms and the router stay as stored. config.json gains the
`quantization_config` (quant_method fp8, fmt e4m3, activation_scheme dynamic,
weight_block_size, modules_to_not_convert: every other module with a 2-D weight, plus those
given); tokenizer and other small files are copied. Quantization is the one the weight sync
uses (`weights/fp8.py`), so this checkpoint and the engines' synced weights agree byte for byte.

Tensors are read, quantized and written one at a time (one shard held at most), into
`<save>.tmp`, renamed to `<save>` when complete. A mistake is one `error:` line, exit code 2.
"""

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

import torch

from config.errors import UserError
from models.fp8_checkpoint import Fp8Format, scale_name
from models.safetensors_io import INDEX_FILE, SafetensorsReader, sibling, write_sharded
from weights.fp8 import DEFAULT_BLOCK, quantize_blockwise

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf")
"""Files not copied: the weights (rewritten) and other weight formats."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one `error:` line, exit 2 (as every Sluice tool)
        raise UserError(f"{message} (see --help)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--hf-checkpoint", required=True, help="bf16 Hugging Face model directory")
    parser.add_argument("--save", required=True, help="FP8 model directory to write")
    parser.add_argument(
        "--weight-block-size",
        type=int,
        nargs=2,
        default=list(DEFAULT_BLOCK),
        metavar=("ROWS", "COLS"),
        help="rows and columns of the blocks that share one scale [128 128]",
    )
    parser.add_argument(
        "--modules-to-not-convert",
        nargs="+",
        default=[],
        metavar="MODULE",
        help="modules (or patterns, `*` = one name component) to keep in bf16 besides the "
        "embeddings, lm_head, norms and router",
    )
    parser.add_argument(
        "--device", default="auto", help="where to quantize: cpu, cuda, cuda:N [auto: cuda if any]"
    )
    parser.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="largest safetensors shard, GB [5]"
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    source, save = Path(args.hf_checkpoint), Path(args.save)
    config = _read_config(source)
    if any(b < 1 for b in args.weight_block_size):
        raise UserError(f"--weight-block-size {args.weight_block_size} must be positive")
    if save.resolve() == source.resolve():
        raise UserError("--save must differ from --hf-checkpoint (the source is read meanwhile)")
    device = _device(args.device)
    reader = SafetensorsReader(source)
    fmt = Fp8Format(tuple(args.weight_block_size), tuple(args.modules_to_not_convert))
    names = reader.names()
    kept = sorted({n.removesuffix(".weight") for n in names if _kept_matrix(reader, fmt, n)})
    fmt = Fp8Format(fmt.block_size, (*kept, *fmt.not_converted))
    quantized = sum(fmt.quantizes(n) for n in names)
    if not quantized:
        raise UserError(
            f"{source} has no Linear projection weight to quantize (q/k/v/o_proj, "
            f"gate/up/down_proj); it is not a model this tool converts"
        )
    config["quantization_config"] = fmt.to_config()
    with tempfile.TemporaryDirectory() as scratch:
        config_file = Path(scratch) / "config.json"
        config_file.write_text(json.dumps(config, indent=2) + "\n")
        extra = [config_file, *_small_files(source)]
        try:
            write_sharded(
                save,
                _converted(reader, names, fmt, device),
                max_shard_bytes=int(args.max_shard_gb * 1e9),
                extra_files=extra,
            )
        except BaseException:
            shutil.rmtree(sibling(save, ".tmp"), ignore_errors=True)  # no half-written copy
            raise
    print(
        f"wrote {save}: {quantized} weights in fp8 ({fmt.block_size[0]}x{fmt.block_size[1]} "
        f"blocks, quantized on {device}), {len(names) - quantized} kept as stored"
    )


def _read_config(source: Path) -> dict:
    path = source / "config.json"
    if not path.is_file():
        raise UserError(
            f"--hf-checkpoint {source} is not a Hugging Face model directory (no config.json)"
        )
    config = json.loads(path.read_text())
    if config.get("quantization_config") is not None:
        method = config["quantization_config"]
        method = method.get("quant_method", "?") if isinstance(method, dict) else "?"
        raise UserError(
            f"{path} already has a quantization_config (quant_method={method}); convert the "
            f"bf16 checkpoint"
        )
    return config


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA GPU; use cpu")
    return device


def _kept_matrix(reader: SafetensorsReader, fmt: Fp8Format, name: str) -> bool:
    """A 2-D weight left in bf16: its module goes into modules_to_not_convert, so that loaders
    which quantize every Linear of a model (transformers) keep it too."""
    shape = reader.shape(name)
    matrix = shape is not None and len(shape) == 2
    return name.endswith(".weight") and matrix and not fmt.quantizes(name)


def _converted(
    reader: SafetensorsReader, names: list[str], fmt: Fp8Format, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    for name in names:
        tensor = reader.read(name)
        if not fmt.quantizes(name):
            yield name, tensor
            continue
        if tensor.element_size() == 1:
            raise UserError(f"{reader.directory}: {name} is already {tensor.dtype}")
        q, scale_inv = quantize_blockwise(tensor.to(device), fmt.block_size)
        yield name, q.cpu()
        yield scale_name(name), scale_inv.cpu()


def _small_files(source: Path) -> list[Path]:
    """Tokenizer, generation config and the like: every top-level file but weights."""
    skip = {"config.json", INDEX_FILE}
    return sorted(
        p
        for p in source.iterdir()
        if p.is_file() and p.name not in skip and not p.name.endswith(WEIGHT_SUFFIXES)
    )


def run(argv: list[str]) -> int:
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
