"""TrainActor: one training rank, its torch.distributed membership and its backend.

Set-up order (the driver's `TrainGroup` runs it):
1. rank 0's `pick_master()` picks its node IP and a free port (through Ray, never by hand);
2. every rank's `init_process_group(address, port)` is called concurrently (each blocks until
   the whole world has joined), then builds its training backend.
Rank 0 alone joins the weight-broadcast group with the engines. Exporting weights is a
collective of the training world (a sharded backend gathers shards as it goes), so
`broadcast_weights`, `weight_checksums`, `named_weights`, `save_hf` and the checkpoint verbs
are called on every rank together; rank 0 does the sending or writing.

With an FP8 rollout checkpoint the weights leave in its format (`weights/fp8_export.py`): the
plan, the broadcast, the CUDA IPC export and the checksums all see the fp8 weights and their
scales, quantized as the buckets are packed (runs of same-shape experts in one batch).
"""

from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import ray
import torch
import torch.distributed as dist

from actors import fault_points
from actors.device import actor_device
from config.schema import SluiceConfig
from data.schema import RolloutBatchRef
from models.fp8_checkpoint import rollout_fp8_format
from training import create_backend
from training.backend import TrainStats
from weights.checksum import tensor_checksums
from weights.fp8_export import export_for
from weights.ipc import IpcExport
from weights.manifest import Bucket, TensorSpec, plan_buckets
from weights.process_group import GroupInfo, init_weights_update_group, pick_master_address_and_port
from weights.runs import StreamItem, pairs
from weights.sync import SyncStats, WeightSender


class TrainActor:
    def __init__(self, config: SluiceConfig, rank: int, world_size: int):
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.device = actor_device()
        self.backend = None
        self.sender: WeightSender | None = None
        self.ipc: IpcExport | None = None
        self.fp8 = export_for(rollout_fp8_format(config.model))
        """How weights leave for FP8 engines (None: as the backend holds them)."""

    def pick_master(self) -> tuple[str, int]:
        return pick_master_address_and_port()

    def init_process_group(self, address: str, port: int) -> int:
        """Join the training world and build the backend; returns this rank's data-parallel
        rank (which share of each step's rows it trains on)."""
        torch.manual_seed(self.config.seed)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://{address}:{port}",
            rank=self.rank,
            world_size=self.world_size,
        )
        self.backend = create_backend(self.config, self.device)
        return self.backend.data_parallel_rank

    def train(
        self,
        batches: list[RolloutBatchRef],
        normalizer: float,
        advantage_shift_scale: tuple[float, float] | None = None,
    ) -> TrainStats:
        """One step's training on this rank's share (its optimizer steps: one, or one per
        mini-batch, `training.mini_batches`); rows are read zero-copy from the store.
        `advantage_shift_scale` (shift, scale): advantages become (a - shift) * scale first
        (REINFORCE++'s normalization over the whole step, computed by the driver)."""
        fault_points.reached("train", self.rank, "train")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        tables = ray.get([b.ref for b in batches])
        if advantage_shift_scale is not None:
            tables = [normalized_advantages(t, *advantage_shift_scale) for t in tables]
        stats = self.backend.train(tables, normalizer)
        stats.record_memory(self.device)
        return stats

    def compute_log_probs(self, batches: list[RolloutBatchRef]) -> list[torch.Tensor]:
        return self.backend.compute_log_probs(ray.get([b.ref for b in batches]))

    # Weight export (a collective; rank 0 sends).

    def weight_plan(self, bucket_bytes: int) -> list[Bucket]:
        return plan_buckets(self._outgoing_specs(self.backend.weight_specs()), bucket_bytes)

    def _outgoing_specs(self, specs: list[TensorSpec]) -> list[TensorSpec]:
        return self.fp8.specs(specs) if self.fp8 is not None else specs

    def _outgoing(self, stream: Iterable[StreamItem]) -> Iterator[StreamItem]:
        """The weights as the engines take them: the backend's stream (with runs), or
        quantized tensor by tensor for FP8 engines (batched within `fp8_export`)."""
        return self.fp8.tensors(pairs(stream)) if self.fp8 is not None else iter(stream)

    def init_weights_update_group(self, info: GroupInfo) -> None:
        self.sender = WeightSender(init_weights_update_group(info, rank=0))

    def close_weights_update_group(self) -> None:
        if self.sender is not None:
            self.sender.group.close()
            self.sender = None

    def broadcast_weights(self, plan: list[Bucket], version: int) -> SyncStats | None:
        fault_points.reached("train", self.rank, "broadcast_weights")
        weights = self.backend.weight_stream()
        if self.sender is None:
            for _ in weights:  # take part in the gathers
                pass
            return None
        try:
            return self.sender.send(plan, self._outgoing(weights), version)
        except BaseException:
            # A member of the weight group failed (an engine died): finish the export so the
            # other training ranks' gathers complete too, and the group can try again.
            for _ in weights:
                pass
            raise

    # Colocated SGLang engines: weights by CUDA IPC handle, one bucket per call (weights/ipc.py).

    def begin_ipc_export(self, serving: bool) -> None:
        self.ipc = IpcExport(self._outgoing(self.backend.weight_stream()), serving, self.device)

    def ipc_bucket(self, bucket: Bucket) -> str | None:
        return self.ipc.bucket(bucket)

    def end_ipc_export(self) -> None:
        self.ipc.finish()
        self.ipc = None

    def weight_checksums(self) -> dict[str, str]:
        """Checksums of the weights as sent (fp8 ones for FP8 engines)."""
        return tensor_checksums(pairs(self._outgoing(self.backend.weight_stream())))

    def named_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of every weight as sent (tests compare them with the engines')."""
        outgoing = pairs(self._outgoing(self.backend.weight_stream()))
        return {n: t.cpu().clone() for n, t in outgoing}

    def save_hf(self, path: str) -> None:
        from transformers.utils import logging as transformers_logging

        # An actor's output reaches the driver's stderr as log lines: a progress bar's carriage
        # returns ("Writing model shards") would only garble them.
        transformers_logging.disable_progress_bar()
        self.backend.save_hf(path)

    def save_checkpoint(self, directory: str) -> None:
        self.backend.save_checkpoint(directory)

    def load_checkpoint(self, directory: str, with_optimizer: bool) -> None:
        self.backend.load_checkpoint(directory, with_optimizer)

    def shutdown(self) -> None:
        if self.sender is not None:
            self.sender.group.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def normalized_advantages(batch: pa.RecordBatch, shift: float, scale: float) -> pa.RecordBatch:
    """`batch` with its advantage column replaced by (advantage - shift) * scale (float32);
    the other columns are the same buffers (zero-copy)."""
    index = batch.schema.get_field_index("advantage")
    column = batch.column(index).to_numpy(zero_copy_only=False).astype(np.float64)
    new = pa.array(((column - shift) * scale).astype(np.float32))
    return batch.set_column(index, batch.schema.field(index), new)
