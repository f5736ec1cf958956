"""Rollout engines behind one interface (`inference.engine.InferenceEngine`), picked by name."""

import torch

from config.errors import UserError
from config.schema import SluiceConfig
from inference.engine import InferenceEngine


def _transformers_engine(config: SluiceConfig, device: torch.device) -> InferenceEngine:
    from inference.transformers_engine import TransformersEngine
    from models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    return TransformersEngine(
        load_model(config.model, config.seed, device),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
        batching=config.rollout.batching,
        max_batch_size=config.rollout.max_batch_size,
    )


ENGINES = {"transformers": _transformers_engine}


def check_engine_type(name: str) -> None:
    if name not in ENGINES:
        raise UserError(
            f"rollout.engine={name!r} is not a known engine; use one of {sorted(ENGINES)}"
        )


def create_engine(config: SluiceConfig, device: torch.device) -> InferenceEngine:
    check_engine_type(config.rollout.engine)
    return ENGINES[config.rollout.engine](config, device)
