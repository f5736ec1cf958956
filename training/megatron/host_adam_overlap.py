"""CPU Adam's host step overlapped with the next forward (`train.overlap_cpu_adam_with_forward`).

megatron-core's HybridDeviceOptimizer steps every parameter on the host, then returns: the GPU
waits for the whole host step (0.32-0.34 s on the 1.25 B-parameter topology model, 1 x H100,
bench/RESULTS.md) before the next forward starts. Here the host steps run on a worker thread,
one parameter at a time in the order the next forward reads them, and the forward waits, layer
by layer, only for the parameters it is about to read: layer i's forward runs while layer i+1's
parameters are stepped on the host. The update is the same one, parameter for parameter (the
same kernels, copies and order of operations), so training is bit-identical to CPU Adam
without the overlap; only when it happens moves.

What waits for what:
- The gradients' copies to the host are queued on the GPU before the optimizer step returns
  (as HybridDeviceOptimizer does); the next step's gradient buffer is zeroed after them.
- Each parameter's copy back to the GPU is queued on a side stream after its host step; the
  forward pre-hook of each transformer layer (and of the model, for the embedding, final norm
  and output layer) waits on the host for that parameter's step and on the GPU for its copy.
- Parameters whose update must be all-gathered over data-parallel ranks (a distributed
  optimizer shard of a group larger than one) are stepped first and gathered at the model's
  first forward, in the same order on every rank; shards of groups of one are whole
  parameters and need no gather.
- Anything else that reads the weights or the optimizer state (export, checkpoints, the next
  optimizer step) calls `finish()` first.
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

HostStepHook = Callable[[int, int, int], None]
"""Called on the worker before each host step with (optimizer step, position, count)."""


@dataclass
class _Step:
    """One deferred host step: its parameters in order and how far the worker is."""

    number: int
    cpu_optimizers: list
    gpu_params: list[torch.Tensor]
    copied: list  # a CUDA event per position, recorded after its copy to the GPU
    done: int = 0
    error: BaseException | None = None
    gathered: bool = False
    condition: threading.Condition = field(default_factory=threading.Condition)


class HostAdamOverlap:
    """Defers megatron-core CPU Adam's host step into the next forward (see the module)."""

    def __init__(self, optimizer, ddp_model):
        from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer
        from megatron.core.transformer.transformer_layer import TransformerLayer

        self.parts = [
            part
            for part in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(getattr(part, "optimizer", None), HybridDeviceOptimizer)
        ]
        # The worker thread starts on device 0; the copies must run on this rank's.
        self._cuda_device = torch.cuda.current_device() if torch.cuda.is_available() else None
        self.on_host_step: HostStepHook | None = None  # for tests: a named point per step
        self.steps_taken = 0
        self._pending: _Step | None = None
        self._positions: dict[int, int] = {}  # model parameter -> position in the step
        self._worker: threading.Thread | None = None
        self._h2d = torch.cuda.Stream() if torch.cuda.is_available() else None
        for part in self.parts:
            # megatron-core's own switch: step the shards, gather later (ours: in forward).
            part._defer_param_sync = True
        module = ddp_model.module
        self._layers = [m for m in module.modules() if isinstance(m, TransformerLayer)]
        in_layers = {id(p) for layer in self._layers for p in layer.parameters()}
        self._outer = [p for p in module.parameters() if id(p) not in in_layers]
        self._gather_groups = [
            (chunk, group)
            for part in self.parts
            for chunk in part.model_chunks
            for group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups
            if group.buckets and group.intra_distributed_optimizer_instance_size > 1
        ]
        gathered = {id(p) for _, group in self._gather_groups for p in group.params}
        # Host order: shards to gather first, then the model's own (embedding, final norm,
        # output layer), then layer by layer: the order the forward reads them.
        stages = [[p for p in module.parameters() if id(p) in gathered], self._outer]
        stages += [list(layer.parameters()) for layer in self._layers]
        self._rank = {}
        for stage in stages:
            for p in stage:
                self._rank.setdefault(id(p), len(self._rank))
        module.register_forward_pre_hook(self._before_model)
        for layer in self._layers:
            layer.register_forward_pre_hook(self._before_layer(layer))

    @property
    def in_flight(self) -> int | None:
        """The number of the optimizer step whose host work is still out, if any."""
        return None if self._pending is None else self._pending.number

    # The optimizer step.

    def step(self, optimizer) -> tuple:
        """`optimizer.step()` (megatron-core's), its host work left running on the worker."""
        self.finish()
        originals = [part.optimizer.step for part in self.parts]
        deferred: list[tuple] = []
        for part in self.parts:
            part.optimizer.step = lambda closure=None, hdo=part.optimizer: deferred.append(
                self._queue_copies(hdo)
            )
        try:
            result = optimizer.step()
        finally:
            for part, original in zip(self.parts, originals, strict=True):
                part.optimizer.step = original
        if deferred:
            self._start(deferred)
        return result

    def _queue_copies(self, hdo) -> tuple:
        """HybridDeviceOptimizer.step's first half: learning rates to the host optimizers and
        the gradients' copies to the host, queued on the GPU."""
        hdo._sync_hdo_param_groups_to_sub_optimizers()
        if hdo.gpu_optimizer is not None:  # train.optimizer_cpu_offload keeps none there
            hdo.gpu_optimizer.step()
        hdo._d2h_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(hdo._d2h_stream):
            hdo._set_sub_optimizer_grads()
        # The next step zeroes the gradient buffers these copies read.
        torch.cuda.current_stream().wait_stream(hdo._d2h_stream)
        return hdo, [
            (optimizer, hdo.cpu_copys_map_gpu_param[optimizer.param_groups[0]["params"][0]])
            for optimizer in hdo.cpu_optimizers
        ]

    def _start(self, deferred: list[tuple]) -> None:
        shard_to_model = {}
        for part in self.parts:
            pairs = zip(part.model_float16_groups, part.shard_float16_groups, strict=True)
            pairs = [*pairs, *zip(part.model_fp32_groups, part.shard_fp32_groups, strict=True)]
            for models, shards in pairs:
                for model_param, shard in zip(models, shards, strict=True):
                    shard_to_model[id(shard)] = model_param
        work = [
            (self._rank[id(shard_to_model[id(gpu_param)])], hdo, optimizer, gpu_param)
            for hdo, pairs in deferred
            for optimizer, gpu_param in pairs
        ]
        work.sort(key=lambda item: item[0])
        self.steps_taken += 1
        step = _Step(
            number=self.steps_taken,
            cpu_optimizers=[(hdo, optimizer) for _, hdo, optimizer, _ in work],
            gpu_params=[gpu_param for *_, gpu_param in work],
            copied=[None] * len(work),
        )
        self._positions = {id(shard_to_model[id(gpu)]): i for i, gpu in enumerate(step.gpu_params)}
        if self._h2d is not None:
            # The copies back overwrite weights the backward just read.
            self._h2d.wait_stream(torch.cuda.current_stream())
        self._pending = step
        self._worker = threading.Thread(target=self._run, args=(step,), daemon=True)
        self._worker.start()

    def _run(self, step: _Step) -> None:
        if self._cuda_device is not None:
            torch.cuda.set_device(self._cuda_device)
        try:
            for position, (hdo, optimizer) in enumerate(step.cpu_optimizers):
                if self.on_host_step is not None:
                    self.on_host_step(step.number, position, len(step.cpu_optimizers))
                event = hdo._cpu_optimizer_map_data_event.pop(optimizer, None)
                if event is not None:
                    event.synchronize()  # its gradient is on the host
                hooks = dict(optimizer._optimizer_step_post_hooks)
                optimizer._optimizer_step_post_hooks.clear()  # megatron-core's copy back
                try:
                    optimizer.step()
                finally:
                    optimizer._optimizer_step_post_hooks.update(hooks)
                step.copied[position] = self._copy_back(optimizer, step.gpu_params[position])
                with step.condition:
                    step.done = position + 1
                    step.condition.notify_all()
        except BaseException as error:  # re-raised on the training thread
            with step.condition:
                step.error = error
                step.condition.notify_all()

    def _copy_back(self, optimizer, gpu_param: torch.Tensor):
        """HybridDeviceOptimizer's copy of the updated weight to the GPU, on our stream."""
        host = optimizer.param_groups[0]["params"][0]
        if self._h2d is None:
            gpu_param.data.copy_(host.data)
            return None
        with torch.cuda.stream(self._h2d):
            gpu_param.data.copy_(host.data, non_blocking=True)
            return self._h2d.record_event()

    # Waiting.

    def _wait_for(self, step: _Step, count: int) -> None:
        """Until the first `count` positions are stepped and their copies queued; the
        current stream then waits for those copies."""
        with step.condition:
            step.condition.wait_for(lambda: step.done >= count or step.error is not None)
        if step.error is not None:
            raise RuntimeError("CPU Adam's host step failed") from step.error
        if count and step.copied[count - 1] is not None:
            torch.cuda.current_stream().wait_event(step.copied[count - 1])

    def _wait_for_params(self, params) -> None:
        step = self._pending
        if step is None:
            return
        positions = [self._positions[id(p)] for p in params if id(p) in self._positions]
        if positions:
            self._wait_for(step, max(positions) + 1)

    def _gather(self, step: _Step) -> None:
        """The data-parallel all-gathers of the updated shards, once per step, in one order
        on every rank (a collective)."""
        if step.gathered:
            return
        self._wait_for_params([p for _, group in self._gather_groups for p in group.params])
        for chunk, group in self._gather_groups:
            chunk._start_bucket_group_param_sync(group, force_sync=False)
        step.gathered = True

    def _before_model(self, module, args):
        if self._pending is not None:
            self._gather(self._pending)
            self._wait_for_params(self._outer)

    def _before_layer(self, layer):
        params = list(layer.parameters())

        def wait(module, args):
            self._wait_for_params(params)

        return wait

    def finish(self) -> None:
        """Complete the host step in flight: weights, gathers and optimizer state final."""
        step = self._pending
        if step is None:
            return
        self._gather(step)
        self._wait_for(step, len(step.cpu_optimizers))
        self._worker.join()
        if self._h2d is not None:
            torch.cuda.current_stream().wait_stream(self._h2d)
        for part in self.parts:
            part.optimizer._sync_sub_optimizers_state_to_hdo()
        self._pending = None
