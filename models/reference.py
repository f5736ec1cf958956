"""Qwen3-30B-A3B, the reference model, and Qwen3-8B (recipes/your-model.yaml's example), as their
published `config.json` files describe them.

Nothing is downloaded: tests, recipes' fake file systems and benchmarks build the config (and,
where they need weights, random ones of a few of its layers) from these fields.
"""

from typing import Any

from transformers import Qwen3Config, Qwen3MoeConfig

QWEN3_30B_A3B: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "dtype": "bfloat16",
}
"""The architecture fields of Qwen/Qwen3-30B-A3B's config.json."""


def qwen3_30b_a3b_config(**overrides: Any) -> Qwen3MoeConfig:
    """Its config, with `overrides` (e.g. `num_hidden_layers=2` for a model that fits)."""
    return Qwen3MoeConfig(**{**QWEN3_30B_A3B, **overrides})


QWEN3_8B: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "dtype": "bfloat16",
}
"""The architecture fields of Qwen/Qwen3-8B's config.json (dense)."""


def qwen3_8b_config(**overrides: Any) -> Qwen3Config:
    return Qwen3Config(**{**QWEN3_8B, **overrides})
