"""slime's (Megatron-LM's) flag names as aliases of our config keys.

Users arrive with slime launch scripts, whose argument arrays (PERF_ARGS, OPTIMIZER_ARGS, ...)
spell settings the Megatron way: `--tensor-model-parallel-size 4 --sequence-parallel`. The
driver accepts those spellings next to our dotted keys, so such an array can be pasted as is.

Rules. A flag given twice: the later one wins, as for dotted keys. A flag and the dotted key it
aliases, both given with different values: an error naming both, since one of them would
otherwise be silently ignored. A switch takes no value, or an explicit true/false.
"""

import argparse
from dataclasses import dataclass
from typing import Any

from config.errors import UserError
from config.loader import typed_value
from config.slime_script import DERIVED, MODEL_FLAGS, MODEL_SWITCHES, RESTATED


@dataclass(frozen=True)
class SeedFlag:
    """One slime/Megatron flag: the dotted key it sets, and whether it is a switch."""

    key: str
    """Our config key, e.g. `train.parallel.tensor`."""

    switch: bool = False
    """A boolean switch: present = true, no value needed (Megatron's `store_true`)."""

    values: tuple[tuple[str, str], ...] = ()
    """(flag value, key value) pairs, for a switch whose key is no boolean: `--use-tis`
    (true) sets algorithm.tis to `on`."""

    keyed_values: tuple[tuple[str, str, str], ...] = ()
    """(flag value, key, key value): a flag whose values set different keys of ours. slime's
    --advantage-estimator names losses and advantages alike: `gspo` is our algorithm.loss,
    `reinforce_plus_plus_baseline` our algorithm.advantage. Other values are refused."""

    pairs: bool = False
    """The flag takes NAME VALUE pairs (slime's `--eval-prompt-data aime PATH ...`), read as
    one mapping {NAME: VALUE}."""

    implies: tuple[tuple[str, str, str], ...] = ()
    """(flag value, key, key value): what else the flag means in slime, set unless that key is
    on the command line too: `--use-tis` also makes the PPO ratio's denominator the trainer's
    recomputed log-probs, since slime always recomputes them."""

    instead: str = ""
    """For a flag with keyed_values: what to give for a value Sluice lacks."""

    def key_for(self, raw: str) -> str:
        """The key that what the user gave the flag sets."""
        if not self.keyed_values:
            return self.key
        for value, key, _ in self.keyed_values:
            if raw.lower() == value:
                return key
        known = ", ".join(value for value, _, _ in self.keyed_values)
        instead = f"; {self.instead}" if self.instead else ""
        raise UserError(
            f"command line: {raw!r} is not one of the values Sluice has: {known}{instead}"
        )

    def key_value(self, raw: str) -> str:
        """The value for the key of what the user gave the flag."""
        for value, _, key_value in self.keyed_values:
            if raw.lower() == value:
                return key_value
        return dict(self.values).get(raw.lower(), raw) if self.values else raw


SEED_FLAGS: dict[str, SeedFlag] = {
    "--tensor-model-parallel-size": SeedFlag("train.parallel.tensor"),
    "--sequence-parallel": SeedFlag("train.parallel.sequence", switch=True),
    "--pipeline-model-parallel-size": SeedFlag("train.parallel.pipeline"),
    "--context-parallel-size": SeedFlag("train.parallel.context"),
    "--expert-model-parallel-size": SeedFlag("train.parallel.expert"),
    "--expert-tensor-parallel-size": SeedFlag("train.parallel.expert_tensor"),
    "--max-tokens-per-gpu": SeedFlag("train.max_tokens_per_micro_batch"),
    # slime always packs a micro-batch's sequences (THD); this switch makes it fill micro-batches
    # up to --max-tokens-per-gpu, which is what packing here does.
    "--use-dynamic-batch-size": SeedFlag("train.pack_sequences", switch=True),
    "--log-probs-chunk-size": SeedFlag("train.log_prob_chunk_tokens"),
    "--global-batch-size": SeedFlag("train.global_batch_size"),
    "--recompute-granularity": SeedFlag("train.recompute_granularity"),
    "--recompute-method": SeedFlag("train.recompute_method"),
    "--recompute-num-layers": SeedFlag("train.recompute_num_layers"),
    "--use-distributed-optimizer": SeedFlag("train.use_distributed_optimizer", switch=True),
    "--optimizer-cpu-offload": SeedFlag("train.optimizer_cpu_offload", switch=True),
    "--overlap-cpu-optimizer-d2h-h2d": SeedFlag("train.overlap_cpu_optimizer_d2h_h2d", switch=True),
    "--use-precision-aware-optimizer": SeedFlag("train.use_precision_aware_optimizer", switch=True),
    "--moe-grouped-gemm": SeedFlag(
        "train.layer_spec", switch=True, values=(("true", "torch"), ("false", "local"))
    ),
    "--lr": SeedFlag("train.lr"),
    "--adam-beta1": SeedFlag("train.adam_beta1"),
    "--adam-beta2": SeedFlag("train.adam_beta2"),
    "--adam-eps": SeedFlag("train.adam_eps"),
    "--weight-decay": SeedFlag("train.weight_decay"),
    "--clip-grad": SeedFlag("train.grad_clip"),
    "--lr-decay-style": SeedFlag("train.lr_decay_style"),
    "--lr-warmup-iters": SeedFlag("train.lr_warmup_iters"),
    "--min-lr": SeedFlag("train.min_lr"),
    "--lr-decay-iters": SeedFlag("train.lr_decay_iters"),
    "--hf-checkpoint": SeedFlag("model.hf_checkpoint"),
    "--load": SeedFlag("checkpoint.load"),
    "--save": SeedFlag("checkpoint.save"),
    "--save-interval": SeedFlag("checkpoint.save_interval"),
    "--prompt-data": SeedFlag("data.prompt_data"),
    "--input-key": SeedFlag("data.input_key"),
    "--label-key": SeedFlag("data.label_key"),
    "--apply-chat-template": SeedFlag("data.apply_chat_template", switch=True),
    "--apply-chat-template-kwargs": SeedFlag("data.chat_template_kwargs"),
    "--rollout-shuffle": SeedFlag("data.shuffle", switch=True),
    "--num-rollout": SeedFlag("num_steps"),
    "--rollout-num-gpus-per-engine": SeedFlag("rollout.gpus_per_engine"),
    "--n-samples-per-prompt": SeedFlag("rollout.samples_per_prompt"),
    "--rollout-max-response-len": SeedFlag("rollout.max_new_tokens"),
    "--rollout-temperature": SeedFlag("rollout.temperature"),
    "--use-tis": SeedFlag(
        "algorithm.tis",
        switch=True,
        values=(("true", "on"), ("false", "off")),
        implies=(("true", "algorithm.old_log_probs", "recompute"),),
    ),
    "--tis-level": SeedFlag("algorithm.tis_level"),
    "--eps-clip": SeedFlag("algorithm.clip_low"),
    "--eps-clip-high": SeedFlag("algorithm.clip_high"),
    # slime's `kl` is the plain log-ratio, our k1.
    "--kl-loss-type": SeedFlag("algorithm.kl_type", values=(("kl", "k1"),)),
    "--rm-type": SeedFlag(
        "rollout.reward",
        keyed_values=(
            ("math", "rollout.reward", "rl.rewards:math_reward"),
            ("deepscaler", "rollout.reward", "rl.rewards:deepscaler_reward"),
        ),
        instead="give your reward function as --rollout.reward module:function",
    ),
    "--colocate": SeedFlag("placement.colocate", switch=True),
    "--bf16": SeedFlag(
        "model.dtype", switch=True, values=(("true", "bfloat16"), ("false", "float32"))
    ),
    "--tis-clip": SeedFlag("algorithm.tis_cap"),
    "--tis-clip-low": SeedFlag("algorithm.tis_floor"),
    "--entropy-coef": SeedFlag("algorithm.entropy_coef"),
    "--advantage-estimator": SeedFlag(
        "algorithm.loss",
        keyed_values=(
            ("grpo", "algorithm.loss", "grpo"),
            ("gspo", "algorithm.loss", "gspo"),
            ("reinforce_plus_plus_baseline", "algorithm.advantage", "reinforce_plus_plus_baseline"),
        ),
    ),
    # R3. slime's --use-routing-replay (R2) replays the routing the trainer itself recorded in
    # its log-prob recompute; R3 gives both of the trainer's forwards the engine's routing, so
    # it covers R2's consistency too, and both spellings turn it on.
    "--use-rollout-routing-replay": SeedFlag("algorithm.routing_replay", switch=True),
    "--use-routing-replay": SeedFlag("algorithm.routing_replay", switch=True),
    "--dynamic-sampling-filter-path": SeedFlag(
        "rollout.dynamic_sampling",
        keyed_values=(
            (
                "slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std",
                "rollout.dynamic_sampling",
                "true",
            ),
        ),
    ),
    "--eval-prompt-data": SeedFlag("eval.prompt_data", pairs=True),
    "--n-samples-per-eval-prompt": SeedFlag("eval.samples_per_prompt"),
    "--eval-max-response-len": SeedFlag("eval.max_new_tokens"),
    "--eval-temperature": SeedFlag("eval.temperature"),
    "--eval-top-p": SeedFlag("eval.top_p"),
    "--eval-interval": SeedFlag("logging.eval_every"),
    # W&B. slime writes TensorBoard only with --use-tensorboard; Sluice keeps it beside W&B
    # (give --logging.backends for another set, MLflow included).
    "--use-wandb": SeedFlag(
        "logging.backends",
        switch=True,
        values=(("true", "tensorboard,wandb"), ("false", "tensorboard")),
    ),
    "--wandb-project": SeedFlag("logging.wandb_project"),
    "--wandb-team": SeedFlag("logging.wandb_team"),
    "--wandb-group": SeedFlag("logging.wandb_group"),
    "--wandb-run-id": SeedFlag("logging.wandb_run_id"),
    "--wandb-mode": SeedFlag("logging.wandb_mode"),
    "--wandb-dir": SeedFlag("logging.wandb_dir"),
    "--wandb-host": SeedFlag("logging.wandb_host"),
    # slime's `--seed` needs no entry: our top-level key `seed` is already the flag `--seed`.
}

# slime flags with a look-alike key of a different meaning: an alias would quietly change the
# run, so the command line refuses them with the conversion instead.
NOT_ALIASED: dict[str, str] = {
    "--micro-batch-size": "slime's --micro-batch-size counts samples per forward; Sluice sizes "
    "micro-batches by tokens: give --max-tokens-per-gpu (train.max_tokens_per_micro_batch)",
    "--moe-enable-deepep": "slime's --moe-enable-deepep: DeepEP is not supported, the "
    "Megatron backend sends tokens to their experts with all-to-all: drop the flag (and "
    "--moe-token-dispatcher-type flex)",
    "--fp8-format": "slime's --fp8-format: Sluice trains in bf16 (model.dtype) and serves FP8 "
    "rollouts only: give an FP8 checkpoint as --hf-checkpoint (docs/fp8.md) and drop "
    "--fp8-format and --fp8-recipe",
    "--fp8-recipe": "slime's --fp8-recipe: Sluice trains in bf16 (model.dtype) and serves FP8 "
    "rollouts only: give an FP8 checkpoint as --hf-checkpoint (docs/fp8.md) and drop "
    "--fp8-format and --fp8-recipe",
    "--use-slime-router": "slime's --use-slime-router: Sluice's rollout actors spread "
    "their requests over the engines' servers themselves (no router process): drop the flag",
    "--num-steps-per-rollout": "slime's --num-steps-per-rollout N is --global-batch-size "
    "(rollout.batch_size / N) here: pass that instead",
    "--num-epoch": "slime's --num-epoch counts passes over the prompt data; Sluice counts RL "
    "steps (--num-rollout, num_steps), and its train.epochs repeats each rollout batch's "
    "optimizer steps (verl's ppo_epochs): set num_steps instead",
    "--custom-generate-function-path": "slime's --custom-generate-function-path names an "
    "`async def generate(args, sample, sampling_params)` that drives slime's router itself; a "
    "Sluice episode is an environment class whose `async def run(self, episode)` is handed the "
    "engine turn by turn (docs/agents.md): move the function's turn loop into one and give "
    "--rollout.environment module:Class (or point agent code at the endpoint, rollout.agent)",
    "--wandb-key": "slime's --wandb-key would keep the API key in config.json, W&B's run "
    "config and the job's logs: set WANDB_API_KEY in the job's environment (ray job submit "
    '--runtime-env-json \'{"env_vars": {"WANDB_API_KEY": ...}}\') or run `wandb login`',
    "--disable-wandb-random-suffix": "slime's --disable-wandb-random-suffix is already so "
    "here (the W&B run is named after logging.output_dir's folder, no suffix): drop the flag",
    "--wandb-always-use-train-step": "slime's --wandb-always-use-train-step is already so "
    "here (every metric is charted against the RL step, W&B's `step` axis): drop the flag",
}

_DEST = "seed:"  # argparse dest prefix of an alias, so its value never mixes with a key's
# ... and of the flags of config.slime_script, one prefix per kind
_RESTATED, _MODEL, _DERIVED = "restated:", "model:", "derived:"
_SWITCH_ON = "true"  # what a bare switch means; read by the key's own type like any value


def add_seed_flags(parser: argparse.ArgumentParser) -> None:
    """Register every alias in a help section of its own."""
    group = parser.add_argument_group(
        "Megatron / slime flag names",
        "slime's spellings of the keys above, so its launch scripts' argument arrays can be "
        "pasted as they are (--seed is the same flag in both). A switch takes no value, or "
        "true/false. A flag and its key given with different values is an error. Not aliased: "
        + "; ".join(NOT_ALIASED.values()),
    )
    for flag, alias in SEED_FLAGS.items():
        if alias.switch:
            group.add_argument(
                flag,
                dest=_DEST + flag,
                nargs="?",
                const=_SWITCH_ON,
                metavar="BOOL",
                help=f"= --{alias.key} {alias.key_value(_SWITCH_ON)}",
            )
        elif alias.pairs:
            group.add_argument(
                flag, dest=_DEST + flag, nargs="+", metavar="NAME VALUE", help=f"= --{alias.key}"
            )
        elif alias.keyed_values:
            choices = "; ".join(f"{v} = --{k} {kv}" for v, k, kv in alias.keyed_values)
            group.add_argument(flag, dest=_DEST + flag, metavar="VALUE", help=choices)
        else:
            group.add_argument(flag, dest=_DEST + flag, metavar="VALUE", help=f"= --{alias.key}")
    _add_script_flags(parser)


def _add_script_flags(parser: argparse.ArgumentParser) -> None:
    """slime's flags that are no alias of one key (config.slime_script), each in its section."""
    sections = [
        (
            "slime flags for what Sluice always does",
            "accepted with the value that says so, refused with any other",
            _RESTATED,
            {f: (r.switch, r.does) for f, r in RESTATED.items()},
        ),
        (
            "slime's model architecture flags (MODEL_ARGS)",
            "Sluice reads the architecture from the checkpoint's config.json; each flag given "
            "is compared with it, and a disagreement is an error",
            _MODEL,
            {f: (f in MODEL_SWITCHES, f"= config.json's {hf}") for f, hf in MODEL_FLAGS.items()},
        ),
        (
            "slime flags with computed keys",
            "each sets a key from its value and other settings",
            _DERIVED,
            {f: (switch, doc.replace("`", "")) for f, (switch, doc) in DERIVED.items()},
        ),
    ]
    for title, description, prefix, flags in sections:
        group = parser.add_argument_group(title, description)
        for flag, (switch, help_text) in flags.items():
            if switch:
                group.add_argument(
                    flag,
                    dest=prefix + flag,
                    nargs="?",
                    const=_SWITCH_ON,
                    metavar="BOOL",
                    help=help_text,
                )
            else:
                group.add_argument(flag, dest=prefix + flag, metavar="VALUE", help=help_text)


def given_script_flags(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """({flag: raw} of the RESTATED, MODEL and DERIVED flags on the command line)."""
    return tuple(
        {
            dest.removeprefix(prefix): raw
            for dest, raw in vars(args).items()
            if dest.startswith(prefix) and raw is not None
        }
        for prefix in (_RESTATED, _MODEL, _DERIVED)
    )


def given_aliases(args: argparse.Namespace) -> dict[str, str]:
    """{flag: raw value} of the aliases on the command line parsed into `args`."""
    return {
        dest.removeprefix(_DEST): raw
        for dest, raw in vars(args).items()
        if dest.startswith(_DEST) and raw is not None
    }


def merge_aliases(keyed: dict[str, Any], aliased: dict[str, str]) -> dict[str, Any]:
    """Dotted overrides plus alias values ({flag: raw}) as one override per key; UserError
    when an alias and its key disagree."""
    merged = dict(keyed)
    for flag, raw in aliased.items():
        if SEED_FLAGS[flag].pairs:
            raw = _pairs(flag, raw)
        key = SEED_FLAGS[flag].key_for(raw)
        # Read as the key's type now, so an error names the flag the user typed.
        value = typed_value(key, SEED_FLAGS[flag].key_value(raw), where=f"command line {flag}")
        if key in keyed and typed_value(key, keyed[key]) != value:
            raise UserError(
                f"command line: {_spelled(flag, raw)} and --{key} {keyed[key]} both set {key}, "
                f"to different values; give only one of them"
            )
        merged[key] = value
        for when, implied, implied_value in SEED_FLAGS[flag].implies:
            if raw.lower() == when and implied not in keyed:
                merged[implied] = typed_value(implied, implied_value)
    return merged


def _pairs(flag: str, words: list[str]) -> dict[str, str]:
    """NAME VALUE [NAME VALUE ...] as {NAME: VALUE}; UserError for an odd count or a name
    given twice (one of its values would be dropped)."""
    if len(words) % 2:
        raise UserError(
            f"command line: {flag} takes NAME PATH pairs, got {len(words)} words: {' '.join(words)}"
        )
    names = words[::2]
    if len(set(names)) < len(names):
        raise UserError(f"command line: {flag} names a set twice: {' '.join(names)}")
    return dict(zip(names, words[1::2], strict=True))


def _spelled(flag: str, raw: str) -> str:
    """How the user wrote an alias: a bare switch shows without its implied value."""
    return flag if SEED_FLAGS[flag].switch and raw == _SWITCH_ON else f"{flag} {raw}"


def unaliased_flag_message(flag: str) -> str | None:
    """Why a known slime flag has no alias (None for any other flag)."""
    reason = NOT_ALIASED.get(flag.split("=", 1)[0])
    return f"command line: {reason}" if reason else None


def alias_names() -> list[str]:
    """Every slime flag without its dashes, for the nearest-name search of an unknown flag."""
    flags = [*SEED_FLAGS, *RESTATED, *MODEL_FLAGS, *DERIVED]
    return [flag.removeprefix("--") for flag in flags]
