"""slime flags that are no alias of one key: settings computed from several flags, flags that
restate what Sluice always does, and the model's architecture flags (MODEL_ARGS).

`config.seed_flags` holds the plain aliases (one flag, one key). What is here:
- DERIVED: flags whose Sluice key takes a value computed from them and other settings
  (slime's --rollout-batch-size counts prompts, rollout.batch_size samples);
- RESTATED: flags for what Sluice always does (it balances the data-parallel ranks by tokens,
  trains without dropout): accepted with the value that says so, refused with any other, since
  that setting cannot be changed here;
- MODEL_FLAGS: Megatron-LM's architecture flags, which Sluice reads from the checkpoint's
  config.json instead: each one given is compared with that file, and a disagreement is an
  error naming the flag (a slime script for another model would otherwise train this one).
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.errors import UserError
from config.loader import read_recipe, typed_value
from config.schema import ModelConfig, RolloutConfig, config_json_readable


@dataclass(frozen=True)
class Restated:
    """A flag for something Sluice always does one way."""

    accepts: tuple[str, ...]
    """The values (lower case; numbers compared as numbers) that say what Sluice does; a
    switch's is `true`."""

    does: str
    """What Sluice does, for the refusal of any other value and for the run's note."""

    switch: bool = False


RESTATED: dict[str, Restated] = {
    "--balance-data": Restated(
        ("true",),
        "the driver always splits a step's samples over the data-parallel ranks balanced by "
        "tokens (data/balance.py)",
        switch=True,
    ),
    "--optimizer": Restated(
        ("adam",),
        "both backends train with Adam with decoupled weight decay (Megatron's `adam`), "
        "configured by train.lr, train.adam_beta1/2, train.adam_eps and train.weight_decay",
    ),
    "--attention-dropout": Restated(("0",), "Sluice trains without dropout"),
    "--hidden-dropout": Restated(("0",), "Sluice trains without dropout"),
    "--accumulate-allreduce-grads-in-fp32": Restated(
        ("true",),
        "the Megatron backend always reduces and accumulates gradients in fp32 "
        "(grad_reduce_in_fp32)",
        switch=True,
    ),
    "--attention-softmax-in-fp32": Restated(
        ("true",),
        "attention always takes its softmax in fp32 (attention_softmax_in_fp32; the flash "
        "kernels accumulate in fp32)",
        switch=True,
    ),
    "--attention-backend": Restated(
        ("flash", "auto"),
        "attention runs through torch's scaled_dot_product_attention, which picks the flash "
        "kernel on a GPU in bf16 (flash varlen for packed rows)",
    ),
    "--moe-token-dispatcher-type": Restated(
        ("alltoall",),
        "the Megatron backend sends tokens to their experts with all-to-all; DeepEP's `flex` "
        "dispatcher is not supported (drop --moe-enable-deepep too)",
    ),
    "--moe-router-dtype": Restated(("fp32",), "the router always computes in fp32"),
    "--moe-token-drop-policy": Restated(
        ("probs", "position"),
        "Sluice's MoE is dropless (no capacity factor), so no token is dropped under either policy",
    ),
    "--moe-aux-loss-coeff": Restated(
        ("0",),
        "Sluice trains without the load-balancing loss (moe_router_load_balancing_type none): "
        "RL fine-tunes an already balanced router",
    ),
    "--transformer-impl": Restated(
        ("local",),
        "the Megatron backend builds its layers without Transformer Engine (train.layer_spec "
        "picks the expert modules)",
    ),
    "--moe-permute-fusion": Restated(
        ("true",),
        "a speed switch for Transformer Engine's fused token permutation; Sluice's layer spec "
        "(train.layer_spec) permutes tokens itself, with the same result",
        switch=True,
    ),
}

MODEL_FLAGS: dict[str, str] = {
    "--disable-bias-linear": "no attention_bias",
    "--qk-layernorm": "Qwen3's q/k norms",
    "--group-query-attention": "num_key_value_heads",
    "--num-attention-heads": "num_attention_heads",
    "--num-query-groups": "num_key_value_heads",
    "--kv-channels": "head_dim",
    "--num-layers": "num_hidden_layers",
    "--hidden-size": "hidden_size",
    "--ffn-hidden-size": "intermediate_size",
    "--normalization": "RMSNorm (Qwen3)",
    "--position-embedding-type": "rope (Qwen3)",
    "--norm-epsilon": "rms_norm_eps",
    "--rotary-percent": "1.0 (Qwen3)",
    "--swiglu": "SwiGLU (Qwen3)",
    "--untie-embeddings-and-output-weights": "tie_word_embeddings false",
    "--vocab-size": "vocab_size",
    "--rotary-base": "rope_theta",
    "--moe-ffn-hidden-size": "moe_intermediate_size",
    "--moe-router-score-function": "softmax (Qwen3-MoE)",
    "--moe-router-topk": "num_experts_per_tok",
    "--moe-router-pre-softmax": "norm_topk_prob false",
    "--moe-layer-freq": "decoder_sparse_step, mlp_only_layers",
    "--num-experts": "num_experts",
}
"""Megatron-LM's architecture flags, each with the config.json field it is compared with."""

MODEL_SWITCHES = (
    "--disable-bias-linear",
    "--qk-layernorm",
    "--group-query-attention",
    "--swiglu",
    "--untie-embeddings-and-output-weights",
    "--moe-router-pre-softmax",
)
"""The switches among them: present or not as config.json says."""

DERIVED: dict[str, tuple[bool, str]] = {
    "--rollout-batch-size": (
        False,
        "`--rollout.batch_size` PROMPTS x rollout.samples_per_prompt (slime counts prompts per "
        "step, Sluice samples)",
    ),
    "--actor-num-nodes": (
        False,
        "`--train.num_workers` N x --actor-num-gpus-per-node (slime's default 8)",
    ),
    "--actor-num-gpus-per-node": (
        False,
        "`--train.num_workers` --actor-num-nodes (slime's default 1) x G",
    ),
    "--use-kl-loss": (
        True,
        "with --kl-loss-coef C: `--algorithm.kl_coef` C (slime adds the KL loss only with "
        "this switch)",
    ),
    "--kl-loss-coef": (
        False,
        "`--algorithm.kl_coef` with --use-kl-loss (0 without it); a nonzero one without "
        "--use-kl-loss is refused, since slime would add no KL loss",
    ),
    "--ref-load": (
        False,
        "`--checkpoint.load` (where training starts; the KL reference is always "
        "model.hf_checkpoint's weights, so with a KL loss give the conversion of "
        "--hf-checkpoint); with --load too: refused, give --ref-load for the first run and "
        "--load to resume (slime falls back from one to the other, Sluice has one "
        "checkpoint.load)",
    ),
}
"""Flags whose keys take a value computed from them (see `derived_overrides`): {flag: (switch,
what it sets)}."""

ACTOR_NODES, ACTOR_GPUS_PER_NODE = 1, 8
"""slime's defaults of --actor-num-nodes and --actor-num-gpus-per-node."""


def check_restated(given: dict[str, str]) -> list[str]:
    """UserError for a RESTATED flag with a value Sluice cannot honour; else the run's note
    listing the accepted ones (empty when none was given)."""
    for flag, raw in given.items():
        restated = RESTATED[flag]
        if not any(_same(raw, value) for value in restated.accepts):
            raise UserError(
                f"command line: {flag} {raw} cannot be honoured: {restated.does}; drop the flag "
                f"(it is accepted only as {flag} {restated.accepts[0]})"
            )
    if not given:
        return []
    return [
        f"slime flags that restate what Sluice always does: {', '.join(given)} "
        "(docs/configuration.md, slime's flags)"
    ]


def _same(raw: str, value: str) -> bool:
    """Whether a flag's raw value is `value`: numbers as numbers (0 = 0.0), words as lower case."""
    try:
        return math.isclose(float(raw), float(value), rel_tol=1e-9)
    except ValueError:
        return raw.strip().lower() == value


def derived_overrides(
    given: dict[str, str], overrides: dict[str, Any], recipe: str | Path
) -> dict[str, Any]:
    """The dotted overrides the DERIVED flags `given` ({flag: raw}) make, on top of the other
    `overrides` (read for the settings they combine with); UserError when one disagrees with a
    dotted key given too."""
    derived: dict[str, tuple[str, Any]] = {}  # key -> (flags, value)
    if "--rollout-batch-size" in given:
        prompts = _count("--rollout-batch-size", given["--rollout-batch-size"])
        samples = overrides.get("rollout.samples_per_prompt") or _recipe_value(
            recipe, "rollout", "samples_per_prompt", RolloutConfig.samples_per_prompt
        )
        derived["rollout.batch_size"] = ("--rollout-batch-size", prompts * int(samples))
    if {"--actor-num-nodes", "--actor-num-gpus-per-node"} & set(given):
        nodes = _count("--actor-num-nodes", given.get("--actor-num-nodes", ACTOR_NODES))
        gpus = _count(
            "--actor-num-gpus-per-node", given.get("--actor-num-gpus-per-node", ACTOR_GPUS_PER_NODE)
        )
        derived["train.num_workers"] = (
            "--actor-num-nodes x --actor-num-gpus-per-node",
            nodes * gpus,
        )
    if kl := _kl_coef(given):
        derived["algorithm.kl_coef"] = kl
    if "--ref-load" in given:
        derived["checkpoint.load"] = ("--ref-load", _ref_load(given["--ref-load"], overrides))
    out = {}
    for key, (flags, value) in derived.items():
        typed = typed_value(key, value, where=f"command line {flags}")
        if key in overrides and typed_value(key, overrides[key]) != typed:
            raise UserError(
                f"command line: {flags} gives {key}={typed} and --{key} {overrides[key]} "
                f"gives another value; give only one of them"
            )
        out[key] = typed
    return out


def _count(flag: str, raw: Any) -> int:
    """A whole number of prompts, nodes or GPUs; UserError naming the flag otherwise."""
    try:
        count = int(str(raw))
    except ValueError:
        count = 0
    if count < 1:
        raise UserError(f"command line: {flag} {raw} should be a whole number >= 1")
    return count


def _kl_coef(given: dict[str, str]) -> tuple[str, float] | None:
    """algorithm.kl_coef from slime's --use-kl-loss / --kl-loss-coef: slime adds the KL loss
    only with --use-kl-loss, weighted by --kl-loss-coef (default 0)."""
    use = given.get("--use-kl-loss")
    on = use is not None and _on("--use-kl-loss", use)
    raw = given.get("--kl-loss-coef", "0")
    coef = float(typed_value("algorithm.kl_coef", raw, where="command line --kl-loss-coef"))
    if not on and coef:
        raise UserError(
            f"command line: --kl-loss-coef {given['--kl-loss-coef']} without --use-kl-loss adds "
            f"no KL loss in slime; add --use-kl-loss (or give --algorithm.kl_coef)"
        )
    if use is None and "--kl-loss-coef" not in given:
        return None
    return ("--use-kl-loss / --kl-loss-coef", coef if on else 0.0)


def _ref_load(path: str, overrides: dict[str, Any]) -> str:
    """Where training starts. slime starts from --ref-load until --load holds a checkpoint of
    the run, then from --load; Sluice has one checkpoint.load and no such fallback."""
    if "checkpoint.load" in overrides:
        raise UserError(
            "command line: --ref-load with --load: slime starts from --ref-load until --load "
            "holds a checkpoint, Sluice from the one checkpoint.load; give --ref-load for the "
            "first run and --load (the --save directory) to resume"
        )
    return path


def _on(flag: str, raw: str) -> bool:
    """A switch's value: bare (true), or an explicit true/false."""
    word = str(raw).strip().lower()
    if word not in ("true", "false"):
        raise UserError(f"command line: {flag} takes no value, or true/false; got {raw!r}")
    return word == "true"


def _recipe_value(recipe: str | Path, section: str, name: str, default: Any) -> Any:
    values = read_recipe(recipe).get(section) or {}
    return values.get(name, default)


def check_model_flags(model: ModelConfig, given: dict[str, str]) -> list[str]:
    """Compare the architecture flags `given` ({flag: raw}) with the checkpoint's config.json;
    UserError naming the first that disagrees. A checkpoint not readable here (a cluster's
    shared file system, seen from a laptop) is compared where the run starts: a note says so."""
    if not given:
        return []
    if not config_json_readable(model.hf_checkpoint):
        return [
            f"{', '.join(given)}: compared with {model.hf_checkpoint}/config.json where the run "
            "starts (not readable here)"
        ]
    from training.megatron.model_config import load_hf_config, model_args

    expected = _flag_values(model_args(load_hf_config(model)))
    where = f"{model.hf_checkpoint}/config.json"
    for flag, raw in given.items():
        if flag in MODEL_SWITCHES:
            wanted = _on(flag, raw)
            if wanted != (flag in expected):
                state = "has" if flag in expected else "does not have"
                raise UserError(
                    f"command line: {flag}{'' if wanted else ' false'} disagrees with {where}, "
                    f"which {state} it; Sluice builds the model from config.json: drop the flag "
                    f"(or point --hf-checkpoint at the model it describes)"
                )
        elif not _model_value_equal(flag, raw, expected.get(flag)):
            raise UserError(
                f"command line: {flag} {raw} disagrees with {where} ({flag} "
                f"{expected.get(flag, 'not set')}); Sluice builds the model from config.json: drop "
                f"the flag (or point --hf-checkpoint at the model it describes)"
            )
    return []


def _flag_values(argv: list[str]) -> dict[str, str | None]:
    """`model_args`' words as {flag: value}, None for a switch."""
    out: dict[str, str | None] = {}
    for i, word in enumerate(argv):
        if word.startswith("--"):
            following = argv[i + 1] if i + 1 < len(argv) else "--"
            out[word] = None if following.startswith("--") else following
    return out


def _model_value_equal(flag: str, raw: str, expected: str | None) -> bool:
    if expected is None:
        return False
    if flag == "--moe-layer-freq":
        return _layer_pattern(raw, expected.count(",") + 1) == _layer_pattern(expected, 0)
    return _same(raw, expected.lower())


def _layer_pattern(raw: str, layers: int) -> list[int] | None:
    """Megatron's --moe-layer-freq as one 0/1 per layer: `[1,0,...]`, `([1]*48)` (slime's
    scripts pass it quoted: `'([1]*48)'`), or N (every Nth layer is MoE); None if unreadable."""
    text = raw.strip().strip("'\"").strip()
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1].strip()
    try:
        if "*" in text:
            block, _, count = text.rpartition("*")
            return _int_list(block) * int(count)
        if text.startswith("["):
            return _int_list(text)
        every = int(text)
        return [1 if (i % every == 0) else 0 for i in range(layers)] if every > 0 else None
    except ValueError:
        return None


def _int_list(text: str) -> list[int]:
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError(text)
    return [int(part) for part in text[1:-1].split(",") if part.strip()]
