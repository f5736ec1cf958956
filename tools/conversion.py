"""What the two checkpoint converters share: flags, config checks, process start-up, errors.

Both run as one plain process or under torchrun (one process per rank). On a machine with
GPUs each rank uses its own GPU over NCCL; without, the CPU over gloo. Every check that can
fail on bad input runs before the process group starts and before megatron-core is imported,
so mistakes are reported in seconds and identically on every rank.
"""

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from config.errors import UserError
from config.schema import ParallelConfig

PARALLEL_FLAGS = {
    "--tensor-model-parallel-size": "tensor",
    "--pipeline-model-parallel-size": "pipeline",
    "--expert-model-parallel-size": "expert",
    "--expert-tensor-parallel-size": "expert_tensor",
}
"""Megatron-LM's parallel-size flags -> the `ParallelConfig` field each sets."""

DTYPES = ("float32", "bfloat16")


def add_parallel_flags(parser: argparse.ArgumentParser) -> None:
    for flag, field in PARALLEL_FLAGS.items():
        parser.add_argument(
            flag,
            dest=field,
            type=int,
            default=1,
            metavar="N",
            help=f"{field.replace('_', ' ')} parallel size [1]",
        )


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    sizes = {field: getattr(args, field) for field in PARALLEL_FLAGS.values()}
    # Sequence parallelism changes no weight, but megatron-core builds MoE layers under
    # tensor parallelism only with it on.
    return ParallelConfig(**sizes, sequence=sizes["tensor"] > 1)


def read_hf_config(directory: str | Path) -> Any:
    """The model's transformers config. A quantized (FP8) checkpoint is refused from the raw
    JSON first: its weights are not the bf16 ones training starts from."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise UserError(f"{directory} is not a Hugging Face model directory (no config.json)")
    quantization = json.loads(path.read_text()).get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise UserError(
            f"{directory} is a quantized checkpoint (quantization_config.quant_method="
            f"{method}); the Megatron checkpoint must be converted from the bf16 Hugging Face "
            f"checkpoint (e.g. Qwen/Qwen3-30B-A3B, not Qwen3-30B-A3B-FP8: the FP8 one is for "
            f"rollouts)"
        )
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(directory)


def model_dtype(hf: Any) -> str:
    """The parameter dtype the config declares (float32 when it declares none)."""
    name = str(getattr(hf, "dtype", None) or "float32").removeprefix("torch.")
    if name not in DTYPES:
        raise UserError(
            f"config.json: dtype {name} is not supported by the Megatron backend; "
            f"supported: {', '.join(DTYPES)}"
        )
    return name


def world_size() -> int:
    """Processes in this run: torchrun's WORLD_SIZE, or 1 for a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_distributed() -> torch.device:
    """Join torchrun's process group, or make a one-process one; return this rank's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device


def build_model(hf: Any, parallel: ParallelConfig, device: torch.device) -> Any:
    """megatron-core's parallel state, then this rank's part of the model (weights unset)."""
    from training.megatron.model import build_gpt_model, init_model_parallel

    init_model_parallel(parallel, seed=0)
    return build_gpt_model(hf, parallel, model_dtype(hf), device)


def is_main_rank() -> bool:
    return dist.get_rank() == 0


def run(main: Callable[[list[str]], None]) -> None:
    """Run a tool's `main(argv)`; a UserError ends it with `error: ...` and exit code 2."""
    try:
        main(sys.argv[1:])
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
