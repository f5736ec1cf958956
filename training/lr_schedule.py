"""The learning rate of each optimizer step: linear warm-up, then constant, linear or cosine
decay (Megatron-LM's / slime's `--lr-decay-style`, `--lr-warmup-iters`, `--min-lr`,
`--lr-decay-iters`), one definition for both training backends.

Steps are counted from 1 (the run's first optimizer step). Warm-up: step k <= W trains with
lr x k / W, so the first step already moves the weights (Megatron-LM's scheduler gives its
first warm-up step lr 0, which would waste a rollout batch) and step W trains with lr. Decay:
step k > W trains with min_lr + (lr - min_lr) x f(p), p = (k - W) / (D - W) capped at 1,
f = 1 - p (linear) or (1 + cos(pi p)) / 2 (cosine), so step D trains with min_lr and every
later one too. `constant` trains with lr after the warm-up.

A backend keeps the count of optimizer steps taken (`ScheduleState`) and saves it with its
checkpoint; `LrSchedule.of` reads the settings from the config, so a resumed run follows the
schedule from the saved count on.
"""

import math
from dataclasses import asdict, dataclass
from typing import Any

from config.schema import SluiceConfig


@dataclass(frozen=True)
class LrSchedule:
    """The resolved schedule settings of a run (see the module docstring)."""

    lr: float
    style: str
    warmup_iters: int
    min_lr: float
    decay_iters: int

    @classmethod
    def of(cls, config: SluiceConfig, saved_decay_iters: int | None = None) -> "LrSchedule":
        """The schedule of `config`; `train.lr_decay_iters` unset is the checkpoint's value
        when resuming (`saved_decay_iters`), else the run's planned optimizer steps."""
        t = config.train
        decay = t.lr_decay_iters
        if decay is None:
            planned = config.num_steps * t.optimizer_steps_per_rollout(config.rollout.batch_size)
            decay = saved_decay_iters if saved_decay_iters is not None else planned
        return cls(t.lr, t.lr_decay_style, t.lr_warmup_iters, t.min_lr, decay)

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (1 = the first)."""
        if step < 1:
            raise ValueError(f"optimizer steps count from 1, got {step}")
        if step <= self.warmup_iters:
            return self.lr * step / self.warmup_iters
        if self.style == "constant":
            return self.lr
        span = self.decay_iters - self.warmup_iters  # > 0 by validation, unless resumed
        progress = min(1.0, (step - self.warmup_iters) / span) if span > 0 else 1.0
        if self.style == "linear":
            factor = 1.0 - progress
        elif self.style == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            raise ValueError(f"unknown lr decay style {self.style!r}")
        return self.min_lr + (self.lr - self.min_lr) * factor


@dataclass
class ScheduleState:
    """A backend's place in the schedule: what its checkpoint saves."""

    schedule: LrSchedule
    steps_taken: int = 0
    """Optimizer steps this run (and the runs it resumed) took."""

    @property
    def last_lr(self) -> float:
        """The learning rate of the last step taken (of the next one before any)."""
        return self.schedule.lr_at(max(self.steps_taken, 1))

    def next_lr(self, param_groups: list[dict[str, Any]]) -> float:
        """Count one more optimizer step and set its learning rate on every parameter group
        (before the optimizer steps); returns it."""
        self.steps_taken += 1
        lr = self.schedule.lr_at(self.steps_taken)
        for group in param_groups:
            if hasattr(group["lr"], "fill_"):  # a tensor lr (a fused or capturable Adam)
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and strings (a torch_dist checkpoint keeps them as common state)."""
        return {"steps_taken": self.steps_taken, **asdict(self.schedule)}

    @classmethod
    def restored(cls, config: SluiceConfig, saved: dict[str, Any] | None) -> "ScheduleState":
        """The state a run resumed from `saved` (None: a checkpoint without one, e.g. written
        before schedules existed or converted from Hugging Face: the count starts at 0)."""
        if saved is None:
            return cls(LrSchedule.of(config))
        # A constant schedule's decay_iters meant nothing: a decay chosen now starts afresh.
        decay = int(saved["decay_iters"]) if saved["style"] != "constant" else None
        schedule = LrSchedule.of(config, saved_decay_iters=decay)
        return cls(schedule, int(saved["steps_taken"]))
