"""Plain PyTorch training backend: DDP over a transformers causal LM.

Every rank holds the full model, so rank 0 can export weights without a gather. Gradients of a
rank's micro-batches accumulate locally (`no_sync`) and are all-reduced once, on the last
backward; ranks may have different numbers of micro-batches (token-balanced shares), and a rank
with no rows still runs one zero-loss backward so the all-reduce always has every rank.
"""

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from config.errors import UserError
from config.schema import SluiceConfig
from models.checkpoint_format import checkpoint_tensors
from models.loading import load_model, load_tokenizer
from models.model_dir import trainer_model
from models.routing import replay_routing, replay_routing_shape
from rl.grpo import aggregate, kl_penalty, log_probs_from_logits
from training.backend import TrainingBackend, TrainStats
from training.batch import (
    MicroBatch,
    pad_micro_batch,
    response_log_probs,
    rows_of,
    split_by_token_budget,
)
from training.loss import LossSettings, policy_term
from training.megatron.checkpoint import TORCH_STATE_FILE


class TorchBackend(TrainingBackend):
    def __init__(self, config: SluiceConfig, device: torch.device):
        self.config = config
        self.device = device
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.loss_settings = LossSettings.of(config)
        self.routing = None
        if config.algorithm.routing_replay:
            self.routing = replay_routing_shape(config)
        self.model = load_model(trainer_model(config.model), config.seed, device).train()
        self.module = self.model
        if self.world_size > 1:
            self.module = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        t = config.train
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=t.lr,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
            weight_decay=t.weight_decay,
        )
        self.reference = None
        if config.algorithm.kl_coef > 0:
            self.reference = load_model(
                trainer_model(config.model), config.seed, device
            ).requires_grad_(False)

    def _token_log_probs(self, model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
        # The policy replays the engines' routing (routing replay on); the frozen reference
        # routes on its own.
        replay = mb.routed_experts is not None and model is not self.reference
        with replay_routing(self.model, mb.routed_experts) if replay else contextlib.nullcontext():
            logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
        return log_probs_from_logits(logits[:, :-1], mb.targets, self.config.rollout.temperature)

    @torch.no_grad()
    def compute_log_probs(self, batches: list[pa.RecordBatch]) -> list[torch.Tensor]:
        rows = rows_of(batches, self.routing)
        out: list[torch.Tensor] = []
        for indices in split_by_token_budget(rows, self.config.train.max_tokens_per_micro_batch):
            mb = pad_micro_batch(rows, indices).to(self.device)
            out += [
                lp.cpu()
                for lp in response_log_probs(self._token_log_probs(self.model, mb), rows, indices)
            ]
        return out

    def train(self, batches: list[pa.RecordBatch], normalizer: float) -> TrainStats:
        start = time.perf_counter()
        rows = rows_of(batches, self.routing)
        plan = split_by_token_budget(rows, self.config.train.max_tokens_per_micro_batch)
        stats = TrainStats(samples=len(rows), micro_batches=len(plan))
        self.optimizer.zero_grad(set_to_none=True)
        if not plan:
            self._empty_backward()
        for k, indices in enumerate(plan):
            last = k == len(plan) - 1
            sync = (
                contextlib.nullcontext()
                if last or self.module is self.model
                else self.module.no_sync()
            )
            with sync:
                self._micro_step(pad_micro_batch(rows, indices).to(self.device), normalizer, stats)
        stats.grad_norm = self._clip_and_step()
        stats.compute_seconds = time.perf_counter() - start
        return stats.flush()

    def _micro_step(self, mb: MicroBatch, normalizer: float, stats: TrainStats) -> None:
        a = self.config.algorithm
        mode = a.loss_aggregation
        log_probs = self._token_log_probs(self.module, mb)
        per_token, loss_stats, corrections = policy_term(log_probs, mb, self.loss_settings)
        pg_loss = aggregate(per_token, mb.loss_mask, mode, normalizer)
        loss = pg_loss
        if self.reference is not None:
            with torch.no_grad():
                ref_log_probs = self._token_log_probs(self.reference, mb)
            kl = aggregate(
                kl_penalty(log_probs, ref_log_probs, a.kl_type), mb.loss_mask, mode, normalizer
            )
            loss = loss + a.kl_coef * kl
        # DDP averages gradients over ranks; the normalizer is already global, so undo the mean.
        (loss * self.world_size).backward()
        kl_loss = kl if self.reference is not None else None
        stats.add_micro_batch(loss, pg_loss, log_probs, mb, loss_stats, corrections, kl_loss)

    def _empty_backward(self) -> None:
        """Join the gradient all-reduce with zero gradients when this rank got no rows."""
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        (self.module(input_ids=ids).logits.sum() * 0.0).backward()

    def _clip_and_step(self) -> float:
        clip = self.config.train.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), clip if clip > 0 else float("inf")
        )
        self.optimizer.step()
        return norm.item()

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from checkpoint_tensors(self.model)

    # Checkpoints: rank 0 writes the model and optimizer (every rank holds the same ones), each
    # rank its RNG state; the driver commits the folder once every rank has returned.

    def save_checkpoint(self, directory: str) -> None:
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(self.device), folder / f"rng_rank{self.rank}.pt")
        if self.rank == 0:  # written last: its presence marks the checkpoint complete
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
            torch.save(state, folder / TORCH_STATE_FILE)
        if self.world_size > 1:
            dist.barrier()

    def load_checkpoint(self, directory: str, with_optimizer: bool) -> None:
        folder = Path(directory)
        path = folder / TORCH_STATE_FILE
        if not path.is_file():
            raise UserError(
                f"checkpoint.load={directory} is not a torch-backend checkpoint (no "
                f"{TORCH_STATE_FILE}); a torch_dist checkpoint (Megatron, or converted from "
                f"Hugging Face) loads with train.backend=megatron"
            )
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        if with_optimizer:
            self.optimizer.load_state_dict(state["optimizer"])
        rng = folder / f"rng_rank{self.rank}.pt"
        if rng.is_file():  # absent for a rank the saving run did not have
            _set_rng_state(torch.load(rng, weights_only=True), self.device)

    def save_hf(self, path: str) -> None:
        if self.world_size > 1 and dist.get_rank() != 0:
            return  # every rank holds the same weights; rank 0 writes
        self.model.save_pretrained(path)
        load_tokenizer(self.config.model).save_pretrained(path)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
