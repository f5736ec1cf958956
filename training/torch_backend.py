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
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from config.errors import UserError
from config.schema import SluiceConfig, TrainConfig
from models.checkpoint_format import checkpoint_tensors
from models.loading import load_model, load_tokenizer
from models.model_dir import trainer_model
from models.routing import replay_routing, replay_routing_shape
from rl.grpo import aggregate, kl_penalty
from training.backend import TrainingBackend, TrainStats
from training.batch import (
    MicroBatch,
    Rows,
    pack_by_token_budget,
    pack_micro_batch,
    pad_micro_batch,
    response_log_probs,
    rows_of,
    split_by_token_budget,
)
from training.loss import LossSettings, policy_term
from training.lr_schedule import LrSchedule, ScheduleState
from training.megatron.checkpoint import TORCH_STATE_FILE
from training.mini_batches import needs_old_log_probs, plan_mini_batches, select_rows
from training.token_stats import token_stats
from training.varlen_attention import use_in_transformers


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
        checkpoint_layers(self.model, config.train)
        # The loss's forward: DDP's, over the policy up to its last hidden states.
        self.module = _HiddenStates(self.model)
        if self.world_size > 1:
            self.module = DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None
            )
        t = config.train
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=t.lr,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
            weight_decay=t.weight_decay,
        )
        self.lr_schedule = ScheduleState(LrSchedule.of(config))
        self.reference = None
        if config.algorithm.kl_coef > 0:
            self.reference = load_model(
                trainer_model(config.model), config.seed, device
            ).requires_grad_(False)
        if config.train.pack_sequences:
            for model in (self.model, self.reference):
                if model is not None:
                    use_in_transformers(model)

    def _replay(self, model: torch.nn.Module, mb: MicroBatch):
        """Inside it, `model` replays the engines' routing of `mb` when it is the policy and
        routing replay is on; the frozen reference routes on its own."""
        replay = mb.routed_experts is not None and model is not self.reference
        return replay_routing(self.model, mb.routed_experts) if replay else contextlib.nullcontext()

    def _token_stats(
        self, model: torch.nn.Module, mb: MicroBatch, entropy_grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of `mb`'s targets and the entropy at each position, [B, T-1] each, from
        `model` (the policy or the reference, or `self.module`), chunk by chunk of tokens
        (`training.token_stats`): the full logits are never built."""
        with self._replay(model, mb):
            # no KV cache: nothing decodes after a training forward
            hidden = _last_hidden_states(
                model, input_ids=mb.input_ids, use_cache=False, **_attention_inputs(mb)
            )
        head = (self.reference if model is self.reference else self.model).get_output_embeddings()
        width = mb.targets.shape[1]
        log_probs, entropy = token_stats(
            hidden[:, :width],
            head.weight,
            mb.targets,
            self.config.rollout.temperature,
            self.config.train.log_prob_chunk_tokens,
            entropy_grad,
        )
        return mb.unpack(log_probs), mb.unpack(entropy)

    def _token_log_probs(self, model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
        return self._token_stats(model, mb)[0]

    def _plan(self, rows: Rows) -> list[list[int]]:
        """The row indices of each micro-batch, packed or padded."""
        budget = self.config.train.max_tokens_per_micro_batch
        if self.config.train.pack_sequences:
            return pack_by_token_budget(rows, budget)
        return split_by_token_budget(rows, budget)

    def _micro_batch(self, rows: Rows, indices: list[int]) -> MicroBatch:
        build = pack_micro_batch if self.config.train.pack_sequences else pad_micro_batch
        return build(rows, indices).to(self.device)

    @torch.no_grad()
    def compute_log_probs(self, batches: list[pa.RecordBatch]) -> list[torch.Tensor]:
        rows = rows_of(batches, self.routing)
        out: list[torch.Tensor] = [torch.empty(0)] * len(rows)
        for indices in self._plan(rows):  # packed micro-batches take rows out of order
            per_token = self._token_log_probs(self.model, self._micro_batch(rows, indices))
            for i, lp in zip(indices, response_log_probs(per_token, rows, indices), strict=True):
                out[i] = lp.cpu()
        return out

    def train(self, batches: list[pa.RecordBatch], normalizer: float) -> TrainStats:
        """The rollout step's optimizer steps (`training.mini_batches`): one by default."""
        start = time.perf_counter()
        rows = rows_of(batches, self.routing)
        t = self.config.train
        minis = plan_mini_batches(
            rows, normalizer, t, self.config.algorithm.loss_aggregation, self.device
        )
        parts = [select_rows(rows, mini.rows) for mini in minis]
        plans = [self._plan(part) for part in parts]
        old = self._old_log_probs(parts, plans) if len(minis) * t.epochs > 1 else None
        ref = self._reference_log_probs(parts, plans) if t.epochs > 1 else None
        stats = TrainStats(samples=len(rows), micro_batches=sum(map(len, plans)))
        grad_norms = []
        for _ in range(t.epochs):
            for j, mini in enumerate(minis):
                olds = old[j] if old is not None else None
                refs = ref[j] if ref is not None else None
                grad_norms.append(
                    self._optimizer_step(parts[j], plans[j], mini.normalizer, stats, olds, refs)
                )
        stats.lr = self.lr_schedule.last_lr
        stats.compute_seconds = time.perf_counter() - start
        return stats.flush().per_rollout_step(len(grad_norms), t.epochs, grad_norms)

    def _optimizer_step(
        self,
        rows: Rows,
        plan: list[list[int]],
        normalizer: float,
        stats: TrainStats,
        old: list[torch.Tensor] | None,
        ref: list[torch.Tensor] | None = None,
    ) -> float:
        """One optimizer step over the micro-batches of `plan`, with their old (and
        reference) log-probs if given; returns the gradient norm."""
        self.optimizer.zero_grad(set_to_none=True)
        if not plan:
            self._empty_backward()
        for k, indices in enumerate(plan):
            last = k == len(plan) - 1
            sync = (
                contextlib.nullcontext() if last or self.world_size == 1 else self.module.no_sync()
            )
            mb = self._micro_batch(rows, indices)
            if old is not None:
                mb.old_log_probs = old[k]
            if ref is not None:
                mb.ref_log_probs = ref[k]
            with sync:
                self._micro_step(mb, normalizer, stats)
        return self._clip_and_step()

    @torch.no_grad()
    def _old_log_probs(
        self, parts: list[Rows], plans: list[list[list[int]]]
    ) -> list[list[torch.Tensor]] | None:
        """The policy's log-probs of every micro-batch before the rollout step's first update,
        when the loss reads them (`needs_old_log_probs`); from the same micro-batches as the
        training forwards, so the first step's ratio is exactly 1."""
        if not needs_old_log_probs(self.loss_settings):
            return None
        return [
            [self._token_log_probs(self.model, self._micro_batch(part, i)) for i in plan]
            for part, plan in zip(parts, plans, strict=True)
        ]

    @torch.no_grad()
    def _reference_log_probs(
        self, parts: list[Rows], plans: list[list[list[int]]]
    ) -> list[list[torch.Tensor]] | None:
        """The frozen reference's log-probs of every micro-batch, once: with several epochs
        each micro-batch trains more than once, and the reference's answer cannot change."""
        if self.reference is None:
            return None
        return [
            [self._token_log_probs(self.reference, self._micro_batch(part, i)) for i in plan]
            for part, plan in zip(parts, plans, strict=True)
        ]

    def _micro_step(self, mb: MicroBatch, normalizer: float, stats: TrainStats) -> None:
        a = self.config.algorithm
        mode = a.loss_aggregation
        log_probs, entropy = self._token_stats(self.module, mb, a.entropy_coef > 0)
        per_token, loss_stats, corrections = policy_term(log_probs, mb, self.loss_settings)
        pg_loss = aggregate(per_token, mb.loss_mask, mode, normalizer)
        entropy = aggregate(entropy, mb.loss_mask, mode, normalizer)
        loss = pg_loss - a.entropy_coef * entropy if a.entropy_coef > 0 else pg_loss
        if self.reference is not None:
            ref_log_probs = mb.ref_log_probs
            if ref_log_probs is None:
                with torch.no_grad():
                    ref_log_probs = self._token_log_probs(self.reference, mb)
            kl = aggregate(
                kl_penalty(log_probs, ref_log_probs, a.kl_type), mb.loss_mask, mode, normalizer
            )
            loss = loss + a.kl_coef * kl
        # DDP averages gradients over ranks; the normalizer is already global, so undo the mean.
        # A recomputed (checkpointed) layer runs its forward, and its router, again in the
        # backward: the replay must still hold there.
        with self._replay(self.module, mb):
            (loss * self.world_size).backward()
        kl_loss = kl if self.reference is not None else None
        # The trainer/engine mismatch is that of the weights that generated: before the update.
        before = log_probs if mb.old_log_probs is None else mb.old_log_probs
        stats.add_micro_batch(loss, pg_loss, before, mb, loss_stats, corrections, kl_loss, entropy)

    def _empty_backward(self) -> None:
        """Join the gradient all-reduce with zero gradients when this rank got no rows."""
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        head = self.model.get_output_embeddings().weight  # used outside the module's forward
        (self.module(input_ids=ids).sum() * 0.0 + head.sum() * 0.0).backward()

    def _clip_and_step(self) -> float:
        clip = self.config.train.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), clip if clip > 0 else float("inf")
        )
        self.lr_schedule.next_lr(self.optimizer.param_groups)
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
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "lr_schedule": self.lr_schedule.state_dict(),
            }
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
            self.lr_schedule = ScheduleState.restored(self.config, state.get("lr_schedule"))
        rng = folder / f"rng_rank{self.rank}.pt"
        if rng.is_file():  # absent for a rank the saving run did not have
            _set_rng_state(torch.load(rng, weights_only=True), self.device)

    def save_hf(self, path: str) -> None:
        if self.world_size > 1 and dist.get_rank() != 0:
            return  # every rank holds the same weights; rank 0 writes
        self.model.save_pretrained(path)
        load_tokenizer(self.config.model).save_pretrained(path)


class _HiddenStates(torch.nn.Module):
    """A causal LM up to its last hidden states (after the final norm): its output layer is
    applied chunk by chunk by `token_stats`. One module, so DDP's forward covers the decoder;
    the output layer's gradient reaches DDP's hooks from the backward all the same."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, **inputs) -> torch.Tensor:
        return self.model.get_decoder()(**inputs).last_hidden_state


def _last_hidden_states(model: torch.nn.Module, **inputs) -> torch.Tensor:
    """`model`'s last hidden states: a causal LM's decoder output, or what `_HiddenStates`
    (or DDP over it) returns."""
    if isinstance(model, PreTrainedModel):
        return model.get_decoder()(**inputs).last_hidden_state
    return model(**inputs)


def _attention_inputs(mb: MicroBatch) -> dict:
    """The model's inputs besides the token ids: a padded micro-batch's padding mask, or a
    packed one's positions and sequence bounds (for `training.varlen_attention`)."""
    if mb.position_ids is None:
        return {"attention_mask": mb.attention_mask}
    bounds = {"cu_seq_lens_q": mb.cu_seqlens, "max_length_q": mb.max_seqlen}
    return {"position_ids": mb.position_ids, **bounds}


def checkpoint_layers(model: torch.nn.Module, train: TrainConfig) -> None:
    """Gradient checkpointing of whole decoder layers (train.recompute_granularity full, the
    torch backend's activation recompute): method uniform (1 layer per chunk) checkpoints
    every layer, block only the first recompute_num_layers. Each checkpointed layer keeps
    only its input and runs its forward again in the backward (torch's non-reentrant
    checkpoint, transformers' default)."""
    if train.recompute_granularity == "off":
        return
    model.gradient_checkpointing_enable()
    if train.recompute_method == "block":
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if train.recompute_num_layers > len(layers):
            raise UserError(
                f"train.recompute_num_layers={train.recompute_num_layers} with "
                f"train.recompute_method=block: the model has {len(layers)} decoder layers; "
                f"use at most {len(layers)}"
            )
        for layer in layers[train.recompute_num_layers :]:
            layer.gradient_checkpointing = False


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
