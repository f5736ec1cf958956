"""A Hugging Face Qwen3 / Qwen3-MoE config -> Megatron model arguments and `TransformerConfig`.

Nothing about the architecture is typed by hand: `model_args(hf_config)` derives the same
`MODEL_ARGS` flags the seed's `scripts/models/qwen3-30B-A3B.sh` lists (so they can be shown and
compared), and `transformer_config(...)` builds megatron-core's config from those values plus
the parallel layout. Anything the converter does not know how to map is refused by name.
"""

from dataclasses import dataclass
from typing import Any

from config.errors import UserError
from config.schema import ModelConfig, ParallelConfig, TrainConfig

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers of a Qwen3-family model, read from its HF config."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    norm_epsilon: float
    rotary_base: float
    max_position_embeddings: int
    num_experts: int | None
    moe_ffn_hidden_size: int | None
    moe_router_topk: int | None
    moe_layer_freq: tuple[int, ...] | None
    norm_topk_prob: bool
    tie_word_embeddings: bool


def _rope_theta(hf: Any) -> float:
    # transformers 5 keeps RoPE settings in `rope_parameters`; 4.x had a flat `rope_theta`.
    params = getattr(hf, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise UserError(
            f"model config: rope scaling {rope_type!r} is not supported by the Megatron "
            f"backend yet; use a checkpoint with default RoPE"
        )
    if theta is None:
        raise UserError("model config: no rope_theta found (rope_parameters.rope_theta)")
    return float(theta)


def model_shape(hf: Any) -> ModelShape:
    """Read the numbers we need; refuse architectures the converter does not cover."""
    if hf.model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"model config: model_type={hf.model_type!r} is not supported by the Megatron "
            f"backend; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(hf, "attention_bias", False):
        raise UserError("model config: attention_bias=true is not supported (Qwen3 has none)")
    moe = hf.model_type == "qwen3_moe"
    layers = hf.num_hidden_layers
    freq = None
    if moe:
        sparse_step = getattr(hf, "decoder_sparse_step", 1) or 1
        dense = set(getattr(hf, "mlp_only_layers", None) or [])
        freq = tuple(0 if (i in dense or (i + 1) % sparse_step != 0) else 1 for i in range(layers))
        if getattr(hf, "shared_expert_intermediate_size", 0):
            raise UserError("model config: shared experts are not supported yet")
    return ModelShape(
        num_layers=layers,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        kv_channels=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        vocab_size=hf.vocab_size,
        norm_epsilon=hf.rms_norm_eps,
        rotary_base=_rope_theta(hf),
        max_position_embeddings=hf.max_position_embeddings,
        num_experts=hf.num_experts if moe else None,
        moe_ffn_hidden_size=hf.moe_intermediate_size if moe else None,
        moe_router_topk=hf.num_experts_per_tok if moe else None,
        moe_layer_freq=freq,
        norm_topk_prob=bool(getattr(hf, "norm_topk_prob", True)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
    )


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def model_args(hf: Any) -> list[str]:
    """The Megatron-LM `MODEL_ARGS` for this config, as the seed's model scripts write them."""
    s = model_shape(hf)
    args = ["--disable-bias-linear", "--qk-layernorm", "--group-query-attention"]
    args += ["--num-attention-heads", str(s.num_attention_heads)]
    args += ["--num-query-groups", str(s.num_query_groups)]
    args += ["--kv-channels", str(s.kv_channels)]
    args += ["--num-layers", str(s.num_layers)]
    args += ["--hidden-size", str(s.hidden_size)]
    args += ["--ffn-hidden-size", str(s.ffn_hidden_size)]
    args += ["--normalization", "RMSNorm", "--position-embedding-type", "rope"]
    args += [
        "--norm-epsilon",
        f"{s.norm_epsilon:g}".replace("e-0", "e-"),
        "--rotary-percent",
        "1.0",
        "--swiglu",
    ]
    if not s.tie_word_embeddings:
        args.append("--untie-embeddings-and-output-weights")
    args += ["--vocab-size", str(s.vocab_size)]
    args += ["--rotary-base", _number(s.rotary_base)]
    if s.num_experts:
        args += ["--moe-ffn-hidden-size", str(s.moe_ffn_hidden_size)]
        args += ["--moe-router-score-function", "softmax"]
        args += ["--moe-token-dispatcher-type", "alltoall"]
        args += ["--moe-router-topk", str(s.moe_router_topk)]
        if not s.norm_topk_prob:
            args.append("--moe-router-pre-softmax")
        args += ["--moe-layer-freq", "[" + ",".join(map(str, s.moe_layer_freq)) + "]"]
        args += ["--num-experts", str(s.num_experts)]
        args += ["--moe-grouped-gemm", "--moe-token-drop-policy", "probs"]
        args += ["--moe-router-dtype", "fp32", "--moe-permute-fusion", "--moe-aux-loss-coeff", "0"]
    return args


def recompute_settings(train: TrainConfig) -> dict[str, Any]:
    """`TransformerConfig`'s activation-recompute fields for `train.recompute_*` (slime's
    --recompute-granularity / --recompute-method / --recompute-num-layers); empty when off.
    megatron-core takes a method and a layer count with `full` only."""
    if train.recompute_granularity == "off":
        return {}
    if train.recompute_granularity == "selective":
        return {"recompute_granularity": "selective"}
    return {
        "recompute_granularity": "full",
        "recompute_method": train.recompute_method,
        "recompute_num_layers": train.recompute_num_layers,
    }


def transformer_config(
    hf: Any, layout: ParallelConfig, dtype: str, recompute: dict[str, Any] | None = None
) -> Any:
    """megatron-core's `TransformerConfig` for this model and parallel layout, with the
    activation-recompute fields of `recompute_settings` (none: no recompute).

    Transformer Engine is not assumed: the expert and attention modules come from our layer
    spec (`layers.decoder_block_spec`), so megatron-core's own grouped-GEMM and permute-fusion
    switches, which need Transformer Engine, stay off here.
    """
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    s = model_shape(hf)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    moe: dict[str, Any] = {}
    if s.num_experts:
        moe = dict(
            num_moe_experts=s.num_experts,
            moe_ffn_hidden_size=s.moe_ffn_hidden_size,
            moe_router_topk=s.moe_router_topk,
            moe_router_score_function="softmax",
            moe_router_pre_softmax=not s.norm_topk_prob,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type="alltoall",
            moe_router_dtype="fp32",
            moe_layer_freq=list(s.moe_layer_freq),
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
            # Dropless: every token reaches its experts, as in the engines.
            moe_expert_capacity_factor=None,
        )
    return TransformerConfig(
        num_layers=s.num_layers,
        hidden_size=s.hidden_size,
        ffn_hidden_size=s.ffn_hidden_size,
        num_attention_heads=s.num_attention_heads,
        num_query_groups=s.num_query_groups,
        kv_channels=s.kv_channels,
        layernorm_epsilon=s.norm_epsilon,
        normalization="RMSNorm",
        qk_layernorm=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        params_dtype=torch_dtype,
        bf16=torch_dtype == torch.bfloat16,
        pipeline_dtype=torch_dtype,
        tensor_model_parallel_size=layout.tensor,
        sequence_parallel=layout.sequence,
        pipeline_model_parallel_size=layout.pipeline,
        context_parallel_size=layout.context,
        expert_model_parallel_size=layout.expert,
        expert_tensor_parallel_size=layout.expert_tensor,
        variable_seq_lengths=True,
        **moe,
        **(recompute or {}),
    )


def load_hf_config(model: ModelConfig) -> Any:
    """The Hugging Face config of `model.hf_checkpoint` (the built-in tiny one in code)."""
    from config.schema import BUILTIN_MODEL

    if model.hf_checkpoint == BUILTIN_MODEL:
        from models.tiny import tiny_config

        return tiny_config()
    from transformers import AutoConfig

    from models.model_dir import check_checkpoint_dir

    return AutoConfig.from_pretrained(check_checkpoint_dir(model.hf_checkpoint))
