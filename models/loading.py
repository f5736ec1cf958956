"""Load the policy (model + tokenizer) named by `model.hf_checkpoint`, in any process."""

from dataclasses import replace
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from config.errors import UserError
from config.schema import BUILTIN_MODEL, ModelConfig
from models.tiny import build_tiny_model, build_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    if config.hf_checkpoint == BUILTIN_MODEL:
        return build_tokenizer()
    return AutoTokenizer.from_pretrained(check_checkpoint_dir(config.hf_checkpoint))


def load_model(
    config: ModelConfig, seed: int, device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """The policy in `config.dtype` on `device`, in eval mode, with SDPA attention."""
    dtype = DTYPES[config.dtype]
    if config.hf_checkpoint == BUILTIN_MODEL:
        model = build_tiny_model(seed, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            check_checkpoint_dir(config.hf_checkpoint), dtype=dtype, attn_implementation="sdpa"
        )
    return model.to(device).eval()


def check_checkpoint_dir(path: str) -> Path:
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise UserError(
            f"model.hf_checkpoint={path} is not a Hugging Face model directory (no config.json); "
            f"point it at one, or use {BUILTIN_MODEL}"
        )
    return directory


def trainer_model(config: ModelConfig) -> ModelConfig:
    """The model the trainers load: `model.train_checkpoint` when given (the bf16 twin of an
    FP8 rollout checkpoint), else `model.hf_checkpoint`."""
    if config.train_checkpoint:
        return replace(config, hf_checkpoint=config.train_checkpoint, train_checkpoint=None)
    return config
