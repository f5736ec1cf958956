"""Rollout engines behind one interface (`inference.engine.InferenceEngine`), picked by name."""

from typing import TYPE_CHECKING

from config.errors import UserError
from config.schema import SluiceConfig

if TYPE_CHECKING:  # torch and transformers load only when an engine is built
    import torch

    from inference.engine import InferenceEngine
    from inference.sglang.engine import EngineSite
    from models.fp8_checkpoint import Fp8Format


def _transformers_engine(
    config: SluiceConfig, device: "torch.device", engine_index: int, site: "EngineSite | None"
) -> "InferenceEngine":
    from inference.transformers_engine import TransformersEngine
    from models.fp8_checkpoint import rollout_fp8_format
    from models.loading import load_model, load_tokenizer
    from models.routing import replay_routing_shape

    tokenizer = load_tokenizer(config.model)
    fp8 = rollout_fp8_format(config.model)
    if fp8 is not None:
        from inference.fp8_model import build_fp8_model, check_fp8_engine_support

        check_fp8_engine_support(config.model, fp8, device)
        model = build_fp8_model(config.model, fp8, device)
    else:
        model = load_model(config.model, config.seed, device)
    return TransformersEngine(
        model,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
        batching=config.rollout.batching,
        max_batch_size=config.rollout.max_batch_size,
        routing=replay_routing_shape(config) if config.algorithm.routing_replay else None,
    )


def _sglang_engine(
    config: SluiceConfig, device: "torch.device", engine_index: int, site: "EngineSite | None"
) -> "InferenceEngine":
    from inference.sglang.engine import SglangEngine

    if site is None:
        raise ValueError("the SGLang engine needs its EngineSite (where its servers run)")
    return SglangEngine(config, engine_index, site)


ENGINES = {"transformers": _transformers_engine, "sglang": _sglang_engine}


def check_engine_config(config: SluiceConfig) -> None:
    """Refuse settings the chosen engine cannot honour, rather than ignore them."""
    r = config.rollout
    if r.engine not in ENGINES:
        raise UserError(
            f"rollout.engine={r.engine!r} is not a known engine; use one of {sorted(ENGINES)}"
        )
    if r.engine == "sglang":
        from inference.sglang.launch import check_sglang_config

        check_sglang_config(config)
    if r.engine == "transformers":
        if r.gpus_per_engine != 1:
            raise UserError(
                f"rollout.gpus_per_engine={r.gpus_per_engine}: the transformers engine runs on "
                f"one GPU; set it to 1 (or raise rollout.num_engines)"
            )
        if r.batching == "continuous" and (r.top_p < 1 or r.top_k > 0):
            raise UserError(
                "rollout.batching=continuous reports log-probs after top-p/top-k truncation, "
                "which the trainer cannot reproduce; use rollout.batching=static with top_p/top_k"
            )


def check_fp8_engines(config: SluiceConfig, use_gpus: bool) -> None:
    """An FP8 rollout checkpoint served by the transformers engine needs GPUs (each engine
    then checks its own GPU's compute capability and fp8 GEMM) and 128 x 128 blocks."""
    from models.fp8_checkpoint import rollout_fp8_format

    if config.rollout.engine != "transformers":
        return
    fp8 = rollout_fp8_format(config.model)
    if fp8 is None:
        return
    if not use_gpus:
        raise UserError(
            f"model.hf_checkpoint={config.model.hf_checkpoint} is an FP8 checkpoint, which the "
            f"transformers engine serves with cuBLAS's block-scaled fp8 GEMM: that needs CUDA GPUs "
            f"of compute capability >= 9.0 (Hopper), and this cluster places the engines on "
            f"CPUs; serve a bf16 checkpoint here, or run on such GPUs"
        )
    check_fp8_block_size(fp8)


TRANSFORMERS_FP8_BLOCK = (128, 128)
"""The only weight blocks cuBLAS's block-scaled fp8 GEMM (the transformers engine's) takes."""


def check_fp8_block_size(fp8: "Fp8Format") -> None:
    """UserError unless the checkpoint's blocks are the 128 x 128 the transformers engine's
    fp8 GEMM takes."""
    if tuple(fp8.block_size) != TRANSFORMERS_FP8_BLOCK:
        raise UserError(
            f"{fp8.source}: quantization_config.weight_block_size is {list(fp8.block_size)}; "
            f"the transformers engine's fp8 GEMM (cuBLAS) takes only [128, 128] (Qwen3's); "
            f"convert the checkpoint again with tools/convert_hf_to_fp8.py (128 x 128 by "
            f"default), or use rollout.engine sglang"
        )


def create_engine(
    config: SluiceConfig,
    device: "torch.device",
    engine_index: int = 0,
    site: "EngineSite | None" = None,
) -> "InferenceEngine":
    """Engine `engine_index` of the config's type; `site` places an engine's servers (SGLang)."""
    check_engine_config(config)
    return ENGINES[config.rollout.engine](config, device, engine_index, site)
