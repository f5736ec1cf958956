"""The megatron-core training backend: TP / SP / PP / EP / ETP, distributed optimizer, CPU Adam.

Every training rank builds its part of a megatron-core GPT model from the Hugging Face config
(`model_config`), loads its shards of the checkpoint (`hf_weights`), and wraps it in
megatron-core's DistributedDataParallel and optimizer. A step runs megatron-core's
forward-backward schedule (which pipelines micro-batches when PP > 1) over micro-batches cut
by a token budget.

What waits for what within one `train` call:
- All ranks first agree on the number of micro-batches (an all-reduce MAX): MoE layers
  exchange tokens between expert-parallel ranks in every forward, so every rank must run the
  same number of forwards; ranks with fewer rows run zero-loss padding micro-batches.
- Gradients are reduced over data-parallel ranks once, after the last micro-batch
  (`finalize_model_grads`), then every rank steps its optimizer shard and the updated
  parameters are all-gathered.

The loss is the RL loss of `rl.grpo` on log-probs (and the entropy) taken by the last stage's
output processor straight from the hidden states, chunk by chunk of tokens and
vocabulary-parallel (`training.token_stats`): no rank ever holds a full-vocabulary row, nor
the [tokens, vocabulary / TP] logits.
"""

import copy
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist

from config.schema import BUILTIN_MODEL, SluiceConfig
from models.loading import DTYPES, load_tokenizer
from models.model_dir import check_checkpoint_dir, trainer_model
from models.routing import RoutingShape, replay_routing_shape
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
from training.megatron.hf_weights import export_hf_weights, hf_weight_specs, load_hf_weights
from training.megatron.host_adam_overlap import HostAdamOverlap
from training.megatron.model import build_gpt_model, init_model_parallel
from training.megatron.model_config import load_hf_config, model_shape, recompute_settings
from training.megatron.parallel import check_megatron_config
from training.megatron.routing_replay import MegatronRoutingReplay, take_router_replays
from training.mini_batches import needs_old_log_probs, plan_mini_batches, select_rows
from training.token_stats import VocabShard, token_stats
from weights.manifest import TensorSpec
from weights.runs import StreamItem, pairs


class MegatronBackend(TrainingBackend):
    def __init__(self, config: SluiceConfig, device: torch.device):
        from megatron.core import parallel_state as ps

        self.config = config
        self.device = device
        self.loss_settings = LossSettings.of(config)
        self.hf_config = load_hf_config(trainer_model(config.model))
        self.shape = model_shape(self.hf_config)
        parallel = config.train.parallel
        check_megatron_config(config.train, config.model.dtype, self.shape)
        init_model_parallel(parallel, config.seed)
        replay = config.algorithm.routing_replay
        self.routing = replay_routing_shape(config) if replay else None
        take_router_replays()  # another model's, built earlier in this process
        model = self._build_model_with_hf_weights(routing_replay=replay, recompute=True)
        self.routing_replay = None
        if replay:
            self.routing_replay = MegatronRoutingReplay(
                take_router_replays(), self.shape, parallel.sequence
            )
        self.model = _wrap_ddp(model, config)
        self.optimizer = _build_optimizer(self.model, config)
        self.host_adam = None  # CPU Adam's host step, when it overlaps the next forward
        if config.train.overlap_cpu_adam_with_forward:
            self.host_adam = HostAdamOverlap(self.optimizer, self.model)
        self.lr_schedule = ScheduleState(LrSchedule.of(config))
        _connect_schedule(model.config, self.model, self.optimizer)
        self.reference = None
        if config.algorithm.kl_coef > 0:
            self.reference = self._build_model_with_hf_weights().eval().requires_grad_(False)
        self.data_parallel_size = ps.get_data_parallel_world_size()
        self._data_parallel_group = ps.get_data_parallel_group()
        self._data_parallel_rank = ps.get_data_parallel_rank()
        # One rank per model replica reports loss statistics, so the driver's sum counts
        # every sample once (TP ranks compute identical losses; only the last stage has them).
        self.reports_stats = (
            ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_last_stage()
        )
        self.is_last_stage = ps.is_pipeline_last_stage()

    @property
    def data_parallel_rank(self) -> int:
        return self._data_parallel_rank

    def _build_model_with_hf_weights(
        self, routing_replay: bool = False, recompute: bool = False
    ) -> Any:
        """A model with the checkpoint's weights; `recompute`: with train.recompute_* (the
        policy, whose backward it serves; the frozen reference runs no backward)."""
        c = self.config
        model = build_gpt_model(
            self.hf_config,
            c.train.parallel,
            c.model.dtype,
            self.device,
            c.train.layer_spec,
            routing_replay,
            recompute_settings(c.train) if recompute else None,
        )
        load_hf_weights(model, _checkpoint_reader(c), self.shape, model.config)
        return model

    # Training.

    def train(self, batches: list[pa.RecordBatch], normalizer: float) -> TrainStats:
        """The rollout step's optimizer steps (`training.mini_batches`): one by default. The
        reference's log-probs, and the policy's before the first step when the loss reads
        them, are taken once per micro-batch, before any step."""
        start = time.perf_counter()
        rows = rows_of(batches, self.routing)
        t = self.config.train
        aggregation = self.config.algorithm.loss_aggregation
        minis = plan_mini_batches(
            rows, normalizer, t, aggregation, self.device, self._data_parallel_group
        )
        built = [self._micro_batches_of(select_rows(rows, mini.rows)) for mini in minis]
        steps = [micro_batches for micro_batches, _ in built]
        stats = TrainStats(samples=len(rows) if self.reports_stats else 0)
        stats.micro_batches = sum(real.count for _, real in built)
        references = [None] * len(steps)
        if self.reference is not None:
            references = [self._forward_only(self.reference, mbs) for mbs in steps]
        if len(steps) * t.epochs > 1 and needs_old_log_probs(self.loss_settings):
            for micro_batches in steps:
                per_token = self._forward_only(self.model, micro_batches)  # last stage only
                for mb, old in zip(micro_batches, per_token, strict=False):
                    mb.old_log_probs = old
        grad_norms = []
        for _ in range(t.epochs):
            for mini, micro_batches, reference in zip(minis, steps, references, strict=True):
                grad_norms.append(
                    self._optimizer_step(micro_batches, mini.normalizer, reference, stats)
                )
        stats.compute_seconds = time.perf_counter() - start
        return stats.flush().per_rollout_step(len(grad_norms), t.epochs, grad_norms)

    def _optimizer_step(self, micro_batches, normalizer, reference, stats) -> float:
        """One optimizer step over `micro_batches` (every rank has as many); returns the
        gradient norm."""
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        scale = len(micro_batches) * self.data_parallel_size
        loss_fn = partial(self._loss, normalizer=normalizer, scale=scale, stats=stats)
        self._schedule(self.model, micro_batches, loss_fn, reference, forward_only=False)
        stats.lr = self.lr_schedule.next_lr(self.optimizer.param_groups)
        if self.host_adam is not None:  # the host step finishes in the next forward
            _, grad_norm, _ = self.host_adam.step(self.optimizer)
        else:
            _, grad_norm, _ = self.optimizer.step()
        return float(grad_norm or 0.0)

    def _finish_host_step(self) -> None:
        """Before anything but a forward reads the weights or the optimizer state."""
        if self.host_adam is not None:
            self.host_adam.finish()

    def _loss(self, mb, reference, output, *, normalizer, scale, stats):
        a = self.config.algorithm
        mode = a.loss_aggregation
        log_probs, entropy = output  # what `_token_stats` returned
        per_token, loss_stats, corrections = policy_term(log_probs, mb, self.loss_settings)
        pg_loss = aggregate(per_token, mb.loss_mask, mode, normalizer)
        entropy = aggregate(entropy, mb.loss_mask, mode, normalizer)
        loss = pg_loss - a.entropy_coef * entropy if a.entropy_coef > 0 else pg_loss
        kl = None
        if reference is not None:
            kl = aggregate(
                kl_penalty(log_probs, reference, a.kl_type), mb.loss_mask, mode, normalizer
            )
            loss = loss + a.kl_coef * kl
        if self.reports_stats:
            # The trainer/engine mismatch is that of the weights that generated.
            before = log_probs if mb.old_log_probs is None else mb.old_log_probs
            stats.add_micro_batch(loss, pg_loss, before, mb, loss_stats, corrections, kl, entropy)
        # megatron-core divides by the number of micro-batches and its data-parallel gradient
        # reduction averages; the normalizer is already the step's global count, so undo both.
        return loss * scale, {}

    def _token_stats(
        self, mb, entropy_grad, *, hidden_states, output_layer, output_weight, **_
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """megatron-core's output processor of the last stage (GPTModel's `output_processor`):
        the log-probs of `mb`'s targets and the entropy at each position, [B, T-1] each,
        from the final hidden states [S (/ TP under SP), B, H], in place of the logits."""
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        weight = output_weight if output_weight is not None else output_layer.weight
        # Every rank of the group takes its vocabulary slice of every position: the whole
        # sequence, whose gradient then sums over the group (as the output layer's own does).
        if output_layer.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=True
            )
        else:
            hidden = copy_to_tensor_model_parallel_region(hidden_states)
        tensor_parallel = ps.get_tensor_model_parallel_world_size() > 1
        shard = VocabShard(
            start=ps.get_tensor_model_parallel_rank() * weight.shape[0],
            group=ps.get_tensor_model_parallel_group() if tensor_parallel else None,
        )
        log_probs, entropy = token_stats(
            hidden.transpose(0, 1)[:, : mb.targets.shape[1]],
            weight,
            mb.targets,
            self.config.rollout.temperature,
            self.config.train.log_prob_chunk_tokens,
            entropy_grad,
            shard,
        )
        return mb.unpack(log_probs), mb.unpack(entropy)

    @torch.no_grad()
    def compute_log_probs(self, batches: list[pa.RecordBatch]) -> list[torch.Tensor]:
        """Per-row response log-probs on the last pipeline stage (an empty list elsewhere).

        A collective: every rank of the training world must call it with its share."""
        micro_batches, real = self._micro_batches(batches)
        per_token = self._forward_only(self.model, micro_batches)
        if not self.is_last_stage:
            return []
        out: list[torch.Tensor] = [torch.empty(0)] * real.samples
        for indices, lp in zip(real.plan, per_token, strict=False):  # packed: out of order
            for i, row in zip(indices, response_log_probs(lp, real.rows, indices), strict=True):
                out[i] = row.cpu()
        return out

    def _forward_only(self, model, micro_batches: list[MicroBatch]) -> list[torch.Tensor]:
        collected: list[torch.Tensor] = []

        def keep(mb, reference, output):
            log_probs, _ = output
            collected.append(log_probs.detach())
            return log_probs.new_zeros(()), {}

        self._schedule(model, micro_batches, keep, None, forward_only=True)
        return collected

    def _schedule(self, model, micro_batches, loss_fn, reference, forward_only: bool) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        references = iter(reference) if reference is not None else None
        # The policy replays the engines' routing (routing replay on); the reference routes
        # on its own.
        replay = self.routing_replay if model is self.model else None
        # The entropy bonus's gradient, only where the policy trains with one.
        entropy_grad = not forward_only and self.config.algorithm.entropy_coef > 0

        def forward_step(data_iterator, chunk):
            mb = next(data_iterator)
            if replay is not None:
                replay.set_micro_batch(mb.routed_experts)
            # The last stage returns `_token_stats`'s pair, the others their hidden states.
            output = chunk(
                mb.input_ids,
                attention_mask=None,
                output_processor=partial(self._token_stats, mb, entropy_grad),
                **_positions(mb),
            )
            ref = next(references) if references is not None else None
            return output, partial(loss_fn, mb, ref)

        width = max(mb.input_ids.shape[1] for mb in micro_batches)
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=width,
            micro_batch_size=max(mb.input_ids.shape[0] for mb in micro_batches),
            forward_only=forward_only,
        )

    def _micro_batches(self, batches: list[pa.RecordBatch]) -> tuple[list[MicroBatch], "_Plan"]:
        return self._micro_batches_of(rows_of(batches, self.routing))

    def _micro_batches_of(self, rows: Rows) -> tuple[list[MicroBatch], "_Plan"]:
        """The rows' micro-batches, as many on every rank (padding ones where it has fewer:
        a collective of the training world)."""
        t = self.config.train
        split, build = (
            (pack_by_token_budget, pack_micro_batch)
            if t.pack_sequences
            else (split_by_token_budget, pad_micro_batch)
        )
        plan = split(rows, t.max_tokens_per_micro_batch)
        count = torch.tensor([len(plan)], dtype=torch.long, device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)  # see the module docstring
        multiple = t.parallel.tensor if t.parallel.sequence else 1
        micro_batches = [_pad_to(build(rows, i), multiple) for i in plan]
        padding = _empty_micro_batch(multiple, self.routing)
        micro_batches += [padding] * (int(count.item()) - len(plan))
        return [mb.to(self.device) for mb in micro_batches], _Plan(plan, rows)

    # Weights out.

    def weight_specs(self) -> list[TensorSpec]:
        return hf_weight_specs(
            self.shape, self.config.train.parallel.expert, DTYPES[self.config.model.dtype]
        )

    def weight_stream(self) -> Iterator[StreamItem]:
        """A collective: every rank must iterate it to the end (shards are gathered)."""
        self._finish_host_step()
        module = self.model.module
        return export_hf_weights(module, self.shape, module.config)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """A collective: every rank must iterate it to the end (shards are gathered)."""
        return pairs(self.weight_stream())

    def save_hf(self, path: str) -> None:
        """A collective; rank 0 writes the Hugging Face directory."""
        from models.safetensors_io import write_sharded

        weights = self.named_weights()
        if dist.get_rank() != 0:
            for _ in weights:
                pass
            return
        write_sharded(path, weights)
        config = copy.deepcopy(self.hf_config)
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config  # read from an FP8 rollout checkpoint: these are bf16
        config.save_pretrained(path)
        load_tokenizer(self.config.model).save_pretrained(path)

    # Checkpoints.

    def save_checkpoint(self, directory: str) -> None:
        from training.megatron.checkpoint import save_torch_dist

        self._finish_host_step()
        save_torch_dist(Path(directory), self.model, self.optimizer, self.lr_schedule.state_dict())

    def load_checkpoint(self, directory: str, with_optimizer: bool) -> None:
        from training.megatron.checkpoint import load_torch_dist

        self._finish_host_step()
        optimizer = self.optimizer if with_optimizer else None
        saved_schedule = load_torch_dist(Path(directory), self.model, optimizer)
        if with_optimizer:
            self.lr_schedule = ScheduleState.restored(self.config, saved_schedule)
        else:
            # The optimizer's fp32 main weights were copied from the model at start-up.
            with torch.no_grad():
                self.optimizer.reload_model_params()


@dataclass
class _Plan:
    """This rank's real rows and their micro-batches (row indices), before padding."""

    plan: list[list[int]]
    rows: Rows

    @property
    def count(self) -> int:
        return len(self.plan)

    @property
    def samples(self) -> int:
        return len(self.rows)


def _positions(mb: MicroBatch) -> dict[str, Any]:
    """The model's position arguments: a padded micro-batch's 0..T-1 in every row, or a
    packed one's THD layout (each row's positions from 0, and its bounds for the attention
    and the rotary embedding)."""
    if mb.position_ids is None:
        positions = torch.arange(mb.input_ids.shape[1], device=mb.input_ids.device)
        return {"position_ids": positions.expand_as(mb.input_ids)}
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, longest = mb.cu_seqlens, mb.max_seqlen
    params = PackedSeqParams("thd", cu, cu, max_seqlen_q=longest, max_seqlen_kv=longest)
    return {"position_ids": mb.position_ids, "packed_seq_params": params}


def _pad_to(mb: MicroBatch, multiple: int) -> MicroBatch:
    """Right-pad the sequence dim to a multiple (sequence parallelism splits it over TP)."""
    extra = -mb.input_ids.shape[1] % multiple
    if not extra:
        return mb
    if mb.position_ids is not None:
        return _pad_packed(mb, extra)
    pad = torch.nn.functional.pad
    return MicroBatch(
        input_ids=pad(mb.input_ids, (0, extra)),
        attention_mask=pad(mb.attention_mask, (0, extra)),
        targets=pad(mb.targets, (0, extra)),
        loss_mask=pad(mb.loss_mask, (0, extra)),
        rollout_log_probs=pad(mb.rollout_log_probs, (0, extra)),
        advantages=mb.advantages,
        routed_experts=_pad_routing(mb.routed_experts, extra),
    )


def _pad_packed(mb: MicroBatch, extra: int) -> MicroBatch:
    """A packed row with `extra` (< TP) padding tokens at its end, as a sequence of their own
    that no real token attends to; the loss reads `targets`' real positions only."""
    pad = torch.nn.functional.pad
    end = mb.cu_seqlens[-1:] + extra
    return dataclasses.replace(
        mb,
        input_ids=pad(mb.input_ids, (0, extra)),
        attention_mask=pad(mb.attention_mask, (0, extra)),
        position_ids=torch.cat([mb.position_ids, torch.arange(extra).unsqueeze(0)], dim=1),
        cu_seqlens=torch.cat([mb.cu_seqlens, end]),
        routed_experts=_pad_routing(mb.routed_experts, extra),
    )


def _pad_routing(routed: torch.Tensor | None, extra: int) -> torch.Tensor | None:
    """`extra` more positions routed to experts 0..top_k-1, as `training.batch` pads."""
    if routed is None:
        return None
    b, _, layers, top_k = routed.shape
    filler = torch.arange(top_k, dtype=routed.dtype).expand(b, extra, layers, top_k)
    return torch.cat([routed, filler], dim=1)


def _empty_micro_batch(multiple: int, routing: RoutingShape | None) -> MicroBatch:
    """One padding row with no loss tokens, for a rank with fewer micro-batches."""
    width = max(2, multiple)
    routed = None
    if routing is not None:
        none_yet = torch.zeros(1, 0, routing.layers, routing.top_k, dtype=torch.int32)
        routed = _pad_routing(none_yet, width)
    return MicroBatch(
        input_ids=torch.zeros(1, width, dtype=torch.long),
        attention_mask=torch.zeros(1, width, dtype=torch.long),
        targets=torch.zeros(1, width - 1, dtype=torch.long),
        loss_mask=torch.zeros(1, width - 1),
        rollout_log_probs=torch.zeros(1, width - 1),
        advantages=torch.zeros(1, 1),
        routed_experts=routed,
    )


def _checkpoint_reader(config: SluiceConfig):
    """Reads a tensor of the trainers' checkpoint by name, in the model's dtype. From an FP8
    rollout checkpoint (when the weights come from `checkpoint.load`, which overwrites them,
    or for the KL reference) its fp8 weights are dequantized with their scales."""
    model = trainer_model(config.model)
    if model.hf_checkpoint == BUILTIN_MODEL:
        from models.checkpoint_format import checkpoint_tensors
        from models.tiny import build_tiny_model

        tensors = dict(
            checkpoint_tensors(build_tiny_model(config.seed, DTYPES[config.model.dtype]))
        )
        return tensors.__getitem__
    from models.fp8_checkpoint import read_fp8_format, tensor_reader
    from models.safetensors_io import SafetensorsReader

    directory = check_checkpoint_dir(model.hf_checkpoint)
    reader = SafetensorsReader(directory)
    return tensor_reader(reader, read_fp8_format(directory), DTYPES[config.model.dtype])


def _wrap_ddp(model, config: SluiceConfig):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=config.train.use_distributed_optimizer,
    )
    return DistributedDataParallel(model.config, ddp_config, module=model)


def _build_optimizer(model, config: SluiceConfig):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    t = config.train
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.grad_clip if t.grad_clip > 0 else 0.0,
        bf16=config.model.dtype == "bfloat16",
        params_dtype=DTYPES[config.model.dtype],
        use_distributed_optimizer=t.use_distributed_optimizer,
        optimizer_cpu_offload=t.optimizer_cpu_offload,
        optimizer_offload_fraction=1.0 if t.optimizer_cpu_offload else 0.0,
        overlap_cpu_optimizer_d2h_h2d=t.overlap_cpu_optimizer_d2h_h2d,
        use_precision_aware_optimizer=t.use_precision_aware_optimizer,
    )
    optimizer = get_megatron_optimizer(optimizer_config, [model])
    if t.optimizer_cpu_offload:
        pin_host_weights(optimizer)
    else:
        use_fused_adam(optimizer)
    return optimizer


def pin_host_weights(optimizer) -> None:
    """Page-lock the fp32 host weights of CPU Adam (megatron-core's HybridDeviceOptimizer).

    It pins its host copies, then, to update in fp32, replaces each bf16 copy with an fp32
    clone that is not pinned; copying the updated weights back to the GPU from pageable
    memory took 0.75 s of a 1.44 s step on the topology model (1 x H200). The tensors keep
    their identity (only `.data` moves), so the optimizer's maps and hooks still hold them."""
    if not torch.cuda.is_available():
        return
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        copies = getattr(getattr(part, "optimizer", None), "gpu_params_map_cpu_copy", {})
        for host in copies.values():
            if not host.is_cuda and not host.is_pinned():
                host.data = host.data.pin_memory()


def use_fused_adam(optimizer) -> None:
    """Step torch's AdamW with its fused kernel (`fused=True`, a documented AdamW option)
    when all its parameters are on a GPU. Without Transformer Engine or Apex, megatron-core
    builds torch's AdamW in its default multi-tensor mode, which took 25 ms of a 0.21 s step
    on the topology model (1 x H200); the fused kernel reads and writes each tensor once.
    Set before the first step, so the optimizer creates its step counts on the GPU as fused
    mode needs."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam):
            continue
        params = [p for group in inner.param_groups for p in group["params"]]
        if params and all(p.is_cuda and p.dtype == torch.float32 for p in params):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False


def _connect_schedule(model_config, ddp_model, optimizer) -> None:
    """What megatron-core's schedule calls around the micro-batches (as Megatron-LM does)."""
    from megatron.core.distributed import finalize_model_grads

    model_config.no_sync_func = ddp_model.no_sync
    model_config.finalize_model_grads_func = finalize_model_grads
    model_config.grad_scale_func = optimizer.scale_loss
