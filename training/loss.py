"""The policy term of the RL loss as both backends compute it, with `auto` settings resolved.

Which log-probs divide the importance ratio and whether TIS weights the tokens depend on the
rollouts: with an FP8 rollout checkpoint TIS is on by default (`algorithm.tis: auto`). The
settings are resolved once per backend from the config (`LossSettings.of`); the driver resolves
them too before any actor starts, so a contradiction fails there.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from config.errors import UserError
from config.schema import TIS_WITH_ROLLOUT_RATIO, AlgorithmConfig, SluiceConfig
from models.fp8_checkpoint import rollout_fp8_format

if TYPE_CHECKING:  # LossSettings imports no torch: the dry run resolves it and stays fast
    from torch import Tensor

    from rl.grpo import PolicyLossStats, TisWeights
    from training.batch import MicroBatch


@dataclass(frozen=True)
class LossSettings:
    """`algorithm` with its `auto` fields decided."""

    old_log_probs: Literal["rollout", "recompute"]
    """Denominator of the PPO ratio."""

    tis: bool
    """Weight each token by its truncated importance weight."""

    tis_cap: float
    """The cap of the TIS weights."""

    tis_floor: float
    """The floor of the TIS weights."""

    clip_low: float
    """Lower clip of the PPO ratio."""

    clip_high: float
    """Upper clip of the PPO ratio."""

    @classmethod
    def resolve(cls, algorithm: AlgorithmConfig, fp8_rollouts: bool) -> "LossSettings":
        """TIS auto = on with fp8 rollouts, unless old_log_probs is rollout (that ratio
        corrects the mismatch already, inside its clip); old_log_probs auto = recompute under
        TIS, else rollout. TIS on with the rollout ratio is a contradiction."""
        a = algorithm
        if a.tis == "on" and a.old_log_probs == "rollout":
            raise UserError(TIS_WITH_ROLLOUT_RATIO)
        tis = a.tis == "on" or (a.tis == "auto" and fp8_rollouts and a.old_log_probs != "rollout")
        old = algorithm.old_log_probs
        if old == "auto":
            old = "recompute" if tis else "rollout"
        if a.max_staleness and old == "recompute" and not tis:
            raise UserError(
                f"algorithm.max_staleness={a.max_staleness} trains on samples of older weights, "
                f"and old_log_probs=recompute without TIS would take them as on-policy (a "
                f"ratio of 1): set algorithm.old_log_probs to rollout (or auto), or "
                f"algorithm.tis=on"
            )
        return cls(old, tis, a.tis_cap, a.tis_floor, algorithm.clip_low, algorithm.clip_high)

    @classmethod
    def of(cls, config: SluiceConfig) -> "LossSettings":
        """The settings of a run (reads the rollout checkpoint's config.json)."""
        return cls.resolve(config.algorithm, rollout_fp8_format(config.model) is not None)


def policy_term(
    log_probs: "Tensor", mb: "MicroBatch", settings: LossSettings
) -> tuple["Tensor", "PolicyLossStats", "TisWeights | None"]:
    """Per-token policy loss [B, T] of a micro-batch (unmasked; `aggregate` it), its PPO
    statistics and, with TIS, the weights used.

    The trainer's old log-probs are this forward's own, detached: a rollout batch takes one
    optimizer step, so they are the log-probs before the update.
    """
    from rl.grpo import policy_loss, truncated_importance_weights

    own = log_probs.detach()
    old = mb.rollout_log_probs if settings.old_log_probs == "rollout" else own
    tis = None
    if settings.tis:
        tis = truncated_importance_weights(
            own, mb.rollout_log_probs, settings.tis_cap, settings.tis_floor
        )
    per_token, stats = policy_loss(
        log_probs,
        old,
        mb.advantages,
        settings.clip_low,
        settings.clip_high,
        token_weights=tis.weights if tis is not None else None,
    )
    return per_token, stats, tis
