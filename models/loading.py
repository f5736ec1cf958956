"""Load the policy (model + tokenizer) named by `model.hf_checkpoint`, in any process."""

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from config.schema import BUILTIN_MODEL, ModelConfig
from models.model_dir import check_checkpoint_dir
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
