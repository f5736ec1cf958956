"""A rollout step's optimizer steps: `train.global_batch_size` samples each, `train.epochs`
passes (slime's `--global-batch-size`, verl's `ppo_epochs`).

Every data-parallel rank cuts its own share (balanced across ranks by tokens, by the driver)
into the same number of contiguous parts; part j of every rank makes mini-batch j, one
optimizer step. Prompt groups may be split between mini-batches: their advantages are
computed before training (by the engines, and the driver's step-wide normalization), so
nothing in the loss reads a whole group.

What waits for what: `plan_mini_batches` is a collective of the data-parallel group (two
all-reduces: the step's sample count, then each mini-batch's normalizer); every rank calls it
before its first forward, the model-parallel peers of a replica with the same rows.
"""

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.distributed as dist

from config.schema import TrainConfig
from training.batch import Rows
from training.loss import LossSettings


@dataclass(frozen=True)
class MiniBatch:
    """The rows of one optimizer step on this rank, and that step's global normalizer."""

    rows: list[int]
    """Indices into the rank's `Rows`."""

    normalizer: float
    """The step's loss tokens (token_mean) or sequences with a loss token (sequence_mean),
    summed over every data-parallel rank: `rl.grpo.aggregate`'s normalizer."""


def mini_batch_count(samples: int, global_batch_size: int) -> int:
    """Optimizer steps per pass: none larger than global_batch_size, nothing dropped."""
    if not global_batch_size:
        return 1
    return max(1, -(-samples // global_batch_size))


def contiguous_parts(size: int, count: int) -> list[list[int]]:
    """0..size-1 in `count` contiguous runs whose lengths differ by at most one (some empty
    when size < count)."""
    bounds = [size * j // count for j in range(count + 1)]
    return [list(range(bounds[j], bounds[j + 1])) for j in range(count)]


def plan_mini_batches(
    rows: Rows,
    normalizer: float,
    train: TrainConfig,
    aggregation: str,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> list[MiniBatch]:
    """This rank's mini-batches of one pass (a collective of the data-parallel `group`, see
    the module docstring). `normalizer` is the driver's for the whole step: one mini-batch,
    as without global_batch_size, keeps it, so that step is today's bit for bit."""
    everything = [MiniBatch(list(range(len(rows))), normalizer)]
    if not train.global_batch_size:
        return everything
    samples = _all_reduced([float(len(rows))], device, group)[0]
    count = mini_batch_count(int(samples), train.global_batch_size)
    if count == 1:
        return everything
    parts = contiguous_parts(len(rows), count)
    local = [_normalizer_count(rows, part, aggregation) for part in parts]
    normalizers = _all_reduced(local, device, group)
    # A mini-batch with nothing to learn from on any rank (no rows, e.g. when a rank holds
    # fewer rows than there are mini-batches, or no loss token) takes no optimizer step:
    # Adam would still move the weights, and the normalizer would be 0. (None left: the step
    # goes as one, as without global_batch_size.)
    kept = [MiniBatch(part, n) for part, n in zip(parts, normalizers, strict=True) if n > 0]
    return kept or everything


def _normalizer_count(rows: Rows, part: list[int], aggregation: str) -> float:
    """The driver's step normalizer (actors/loop.py), for these rows only: their loss tokens
    (`token_mean`) or their number (`sequence_mean`)."""
    if aggregation == "token_mean":
        return float(sum(np.sum(rows.loss_masks[i]) for i in part))
    if aggregation == "sequence_mean":
        return float(len(part))
    raise ValueError(f"unknown aggregation {aggregation!r}; use token_mean or sequence_mean")


def _all_reduced(values: list[float], device: torch.device, group) -> list[float]:
    if not dist.is_initialized():
        return values
    # float64 holds any token count exactly
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()


def select_rows(rows: Rows, indices: list[int]) -> Rows:
    """The rows `indices` as a `Rows` of their own (views; nothing is copied). Every per-row
    field is picked, whatever `Rows` holds."""
    picked = {}
    for f in fields(rows):
        value = getattr(rows, f.name)
        if isinstance(value, np.ndarray):
            value = value[indices]
        elif isinstance(value, list) and len(value) == len(rows):
            value = [value[i] for i in indices]
        picked[f.name] = value
    return Rows(**picked)


def needs_old_log_probs(settings: LossSettings) -> bool:
    """Whether the loss reads the trainer's log-probs before the update: the ratio's
    denominator (old_log_probs recompute) or the TIS / MIS weights against the engine's."""
    return settings.old_log_probs == "recompute" or settings.tis or settings.mis != "off"
