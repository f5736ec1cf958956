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

    loss: Literal["grpo", "gspo"] = "grpo"
    """Token-level (GRPO / PPO) or sequence-level (GSPO) ratio and clip."""

    tis_level: Literal["token", "sequence", "geometric"] = "token"
    """TIS weights per token, or per sequence (product or geometric mean of its ratios)."""

    mis: Literal["off", "token", "sequence", "geometric"] = "off"
    """Masked importance sampling: drop tokens (or sequences) out of [mis_low, mis_high]."""

    mis_low: float = 0.5
    mis_high: float = 2.0

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
        return cls(
            old,
            tis,
            a.tis_cap,
            a.tis_floor,
            a.clip_low,
            a.clip_high,
            a.loss,
            a.tis_level,
            a.mis,
            a.mis_low,
            a.mis_high,
        )

    @classmethod
    def of(cls, config: SluiceConfig) -> "LossSettings":
        """The settings of a run (reads the rollout checkpoint's config.json)."""
        return cls.resolve(config.algorithm, rollout_fp8_format(config.model) is not None)


@dataclass(frozen=True)
class Corrections:
    """What corrected the trainer/engine mismatch in one micro-batch's loss (detached)."""

    tis: "TisWeights | None" = None
    """TIS weights, when on."""

    kept: "Tensor | None" = None
    """bool [B, T]: the tokens MIS kept, when on."""

    def token_weights(self) -> "Tensor | None":
        """The factor of each token's loss: TIS weight, times 0 for tokens MIS dropped."""
        weights = None if self.tis is None else self.tis.weights
        if self.kept is not None:
            weights = self.kept.float() if weights is None else weights * self.kept
        return weights


def policy_term(
    log_probs: "Tensor", mb: "MicroBatch", settings: LossSettings
) -> tuple["Tensor", "PolicyLossStats", Corrections]:
    """Per-token policy loss [B, T] of a micro-batch (unmasked; `aggregate` it), its ratio
    statistics and the mismatch corrections used (TIS weights, MIS mask).

    The trainer's old log-probs are the micro-batch's `old_log_probs` when a rollout step
    takes several optimizer steps (computed before the first), else this forward's own,
    detached: with one step they are the log-probs before the update.
    """
    from rl.grpo import (
        gspo_loss,
        masked_importance_sampling,
        policy_loss,
        truncated_importance_weights,
    )

    s = settings
    own = log_probs.detach() if mb.old_log_probs is None else mb.old_log_probs
    old = mb.rollout_log_probs if s.old_log_probs == "rollout" else own
    corrections = Corrections(
        tis=truncated_importance_weights(
            own, mb.rollout_log_probs, s.tis_cap, s.tis_floor, mb.loss_mask, s.tis_level
        )
        if s.tis
        else None,
        kept=masked_importance_sampling(
            own, mb.rollout_log_probs, mb.loss_mask, s.mis_low, s.mis_high, s.mis
        )
        if s.mis != "off"
        else None,
    )
    weights = corrections.token_weights()
    if s.loss == "gspo":
        # GSPO's sequence ratio is the geometric mean over the tokens MIS keeps: zeroing a
        # dropped token's own loss is not enough, since every kept token's loss carries the
        # ratio, and a ratio over all tokens would still pass the dropped token's (untrusted)
        # log-prob gradient. Over the kept tokens it is GSPO's objective on the kept part of
        # the sequence, so masking is sound and the pair is allowed.
        ratio_mask = mb.loss_mask if corrections.kept is None else mb.loss_mask * corrections.kept
        per_token, stats = gspo_loss(
            log_probs, old, mb.advantages, ratio_mask, s.clip_low, s.clip_high, weights
        )
    else:
        per_token, stats = policy_loss(
            log_probs, old, mb.advantages, s.clip_low, s.clip_high, token_weights=weights
        )
    return per_token, stats, corrections
