"""The training-backend interface a TrainActor drives, and its per-step statistics."""

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, fields

import psutil
import pyarrow as pa
import torch
import torch.distributed as dist

from rl.grpo import log_prob_mismatch
from weights.manifest import TensorSpec, manifest_of
from weights.runs import StreamItem

# Reduced by the slowest / largest rank; every other field is summed.
MAX_OVER_RANKS = (
    "logprob_abs_diff_max",
    "grad_norm",
    "compute_seconds",
    "gpu_peak_gb",
    "host_rss_gb",
    "optimizer_steps",
    "lr",
)

STEP_MEANS = ("loss", "policy_loss", "kl_loss", "entropy")
"""Loss terms, each normalized within its own optimizer step: a rollout step of several
reports their mean over them (`TrainStats.per_rollout_step`)."""


@dataclass
class TrainStats:
    """One rank's contribution to a step's training metrics.

    Loss terms are already divided by the step's GLOBAL normalizer, so summing them over ranks
    gives the step's loss; `*_sum` fields are token sums (divide by the summed `tokens`).
    `reduce` combines the ranks once, in the driver.
    """

    loss: float = 0.0
    policy_loss: float = 0.0
    kl_loss: float = 0.0
    entropy: float = 0.0
    """The policy's entropy per response token, aggregated like the loss (its share)."""
    tokens: float = 0.0
    samples: int = 0
    micro_batches: int = 0
    clipped_sum: float = 0.0
    logprob_abs_diff_sum: float = 0.0
    logprob_abs_diff_max: float = 0.0
    importance_ratio_sum: float = 0.0
    rollout_kl_sum: float = 0.0
    tis_tokens: float = 0.0
    tis_truncated_sum: float = 0.0
    tis_weight_sum: float = 0.0
    mis_tokens: float = 0.0
    mis_masked_sum: float = 0.0
    advantage_samples: float = 0.0
    """Samples with at least one loss token: those whose advantage the loss applied."""
    advantage_sum: float = 0.0
    advantage_square_sum: float = 0.0
    grad_norm: float = 0.0
    lr: float = 0.0
    """The learning rate of the rank's last optimizer step (the same on every rank)."""
    compute_seconds: float = 0.0
    gpu_peak_gb: float = 0.0
    """Peak GPU memory allocated by torch during the step (10^9 bytes; 0 on a CPU)."""
    host_rss_gb: float = 0.0
    """The rank's resident host memory after the step (CPU Adam keeps its state there)."""
    optimizer_steps: int = 0
    """Optimizer steps the rollout step took (train.global_batch_size, train.epochs)."""

    def record_memory(self, device: torch.device) -> None:
        """Fill the memory fields; on CUDA, the peak since the caller reset the counter."""
        if device.type == "cuda":
            self.gpu_peak_gb = torch.cuda.max_memory_allocated(device) / 1e9
        self.host_rss_gb = psutil.Process().memory_info().rss / 1e9

    def add_micro_batch(
        self,
        loss,
        policy_loss,
        log_probs,
        mb,
        loss_stats,
        corrections=None,
        kl_loss=None,
        entropy=None,
    ) -> None:
        """Accumulate one micro-batch: its loss terms and the trainer/engine mismatch of its
        loss tokens (`mb` is a `training.batch.MicroBatch`, `loss_stats` from the policy loss,
        `corrections` the `training.loss.Corrections` it used, `kl_loss` the KL term, if any,
        `entropy` the aggregated entropy).

        The figures stay on the device until `flush` reads them all at once: a `.item()` for
        each would stall the GPU's queue about ten times per micro-batch."""
        mask = mb.loss_mask.bool()
        applied = mask.any(dim=-1)  # padding rows and empty responses carry no advantage
        advantages = torch.where(applied, mb.advantages[:, 0].double(), 0.0)
        tis = corrections.tis if corrections is not None else None
        kept = corrections.kept if corrections is not None else None
        mismatch = log_prob_mismatch(log_probs.detach(), mb.rollout_log_probs, mb.loss_mask)
        tokens = mismatch["num_tokens"]
        zero = tokens.new_zeros(())
        row = {
            "loss": loss.detach(),
            "policy_loss": policy_loss.detach(),
            "kl_loss": zero if kl_loss is None else kl_loss.detach(),
            "entropy": zero if entropy is None else entropy.detach(),
            "tokens": tokens,
            "clipped_sum": (loss_stats.clipped & mask).sum(),
            "logprob_abs_diff_sum": mismatch["logprob_abs_diff_mean"] * tokens,
            "logprob_abs_diff_max": mismatch["logprob_abs_diff_max"],
            "importance_ratio_sum": mismatch["importance_ratio_mean"] * tokens,
            "rollout_kl_sum": mismatch["kl_k3"] * tokens,
            "tis_tokens": zero if tis is None else mask.sum(),
            "tis_truncated_sum": zero if tis is None else (tis.truncated & mask).sum(),
            "tis_weight_sum": zero if tis is None else (tis.weights * mask).sum(),
            "mis_tokens": zero if kept is None else mask.sum(),
            "mis_masked_sum": zero if kept is None else (~kept & mask).sum(),
            "advantage_samples": applied.sum(),
            "advantage_sum": advantages.sum(),
            "advantage_square_sum": advantages.square().sum(),
        }
        # Kept outside the dataclass fields, which travel to the driver: `flush` empties it.
        self.__dict__.setdefault("_pending", []).append(row)

    def flush(self) -> "TrainStats":
        """Add the micro-batches of `add_micro_batch` into the fields (one device read).
        Backends call it before returning the stats. Returns self."""
        pending = self.__dict__.pop("_pending", [])
        if not pending:
            return self
        names = list(pending[0])
        rows = torch.stack([torch.stack([row[n].double() for n in names]) for row in pending])
        for name, column in zip(names, rows.cpu().unbind(1), strict=True):
            if name in MAX_OVER_RANKS:
                setattr(self, name, max(getattr(self, name), column.max().item()))
            else:
                setattr(self, name, getattr(self, name) + column.sum().item())
        return self

    def per_rollout_step(self, steps: int, epochs: int, grad_norms: list[float]) -> "TrainStats":
        """After `steps` optimizer steps in `epochs` passes over the same rows (flushed): the
        loss terms become their mean over the steps, grad_norm the mean of `grad_norms`, and
        every other sum one pass's worth, so that `train/tokens` counts the rows once while
        the ratios of sums (clip fraction, mismatch, advantages) are means over every pass.
        Returns self."""
        self.optimizer_steps = steps
        self.grad_norm = sum(grad_norms) / len(grad_norms)
        for f in fields(TrainStats):
            if f.name in STEP_MEANS:
                setattr(self, f.name, getattr(self, f.name) / steps)
            elif f.name not in MAX_OVER_RANKS and f.name not in ("samples", "micro_batches"):
                setattr(self, f.name, getattr(self, f.name) / epochs)
        return self

    @staticmethod
    def reduce(per_rank: list["TrainStats"]) -> dict[str, float]:
        total = TrainStats()
        for stats in per_rank:
            for f in fields(TrainStats):
                value = getattr(stats, f.name)
                if f.name in MAX_OVER_RANKS:
                    setattr(total, f.name, max(getattr(total, f.name), value))
                else:
                    setattr(total, f.name, getattr(total, f.name) + value)
        tokens = max(total.tokens, 1.0)
        corrections = {}
        if total.tis_tokens:
            corrections = {
                "mismatch/tis_clip_fraction": total.tis_truncated_sum / total.tis_tokens,
                "mismatch/tis_weight_mean": total.tis_weight_sum / total.tis_tokens,
            }
        if total.mis_tokens:
            corrections["mismatch/mis_masked_fraction"] = total.mis_masked_sum / total.mis_tokens
        samples = max(total.advantage_samples, 1.0)
        advantage_mean = total.advantage_sum / samples
        advantage_variance = max(total.advantage_square_sum / samples - advantage_mean**2, 0.0)
        return {
            "train/loss": total.loss,
            "train/policy_loss": total.policy_loss,
            "train/kl_loss": total.kl_loss,
            "train/entropy": total.entropy,
            "train/clip_fraction": total.clipped_sum / tokens,
            "train/grad_norm": total.grad_norm,
            "train/lr": total.lr,
            "train/optimizer_steps": total.optimizer_steps,
            "train/tokens": total.tokens,
            "train/samples": total.samples,
            # Of the advantages the loss applied (after any normalization by the trainers):
            # REINFORCE++'s step normalization shows here as mean 0, std 1.
            "train/advantage_mean": advantage_mean,
            "train/advantage_std": math.sqrt(advantage_variance),
            "train/compute_seconds": total.compute_seconds,
            "mismatch/logprob_abs_diff_mean": total.logprob_abs_diff_sum / tokens,
            "mismatch/logprob_abs_diff_max": total.logprob_abs_diff_max,
            "mismatch/importance_ratio_mean": total.importance_ratio_sum / tokens,
            "mismatch/kl_k3": total.rollout_kl_sum / tokens,
            "memory/train_gpu_peak_gb": total.gpu_peak_gb,
            "memory/train_host_rss_gb": total.host_rss_gb,
            **corrections,
        }


class TrainingBackend(ABC):
    """Owns the model and optimizer of one training rank.

    The process group is already initialised when a backend is built (the TrainActor does it).
    """

    @abstractmethod
    def compute_log_probs(self, batches: list[pa.RecordBatch]) -> list[torch.Tensor]:
        """The current policy's log-prob of every response token, one tensor per row."""

    @abstractmethod
    def train(self, batches: list[pa.RecordBatch], normalizer: float) -> TrainStats:
        """One step's training on this rank's share: one optimizer step, or one per mini-batch
        of train.global_batch_size samples, train.epochs times (`training.mini_batches`, a
        collective of the data-parallel ranks); `normalizer` is the step's global count of
        loss tokens (or sequences), the same on every rank."""

    @abstractmethod
    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full weights under the checkpoint's (Hugging Face) names, in `weight_specs` order.

        A collective: every rank iterates it to the end (a sharded backend gathers as it goes);
        only rank 0 sends what it yields."""

    def weight_stream(self) -> Iterator[StreamItem]:
        """`named_weights` with runs of same-shape tensors that lie back to back (an MoE
        layer's experts) as `TensorRun`s, so the sync packs each run in one copy. A collective,
        like `named_weights`; by default, the pairs themselves."""
        return self.named_weights()

    def weight_specs(self) -> list[TensorSpec]:
        """Names, dtypes and shapes of `named_weights`, without gathering anything."""
        return manifest_of(self.named_weights())

    @abstractmethod
    def save_hf(self, path: str) -> None:
        """Write the policy as a Hugging Face model directory (a collective; rank 0 writes)."""

    @property
    def data_parallel_rank(self) -> int:
        """Which share of the step's rows this rank trains on (model-parallel peers share)."""
        return dist.get_rank() if dist.is_initialized() else 0

    def save_checkpoint(self, directory: str) -> None:
        """Write the full training state (a collective)."""
        raise NotImplementedError(f"{type(self).__name__} has no training checkpoints")

    def load_checkpoint(self, directory: str, with_optimizer: bool) -> None:
        """Restore what `save_checkpoint` wrote (a collective)."""
        raise NotImplementedError(f"{type(self).__name__} has no training checkpoints")
