"""Both sides of one weight transfer over a `BroadcastGroup`: the trainer sends, engines receive.

Concurrency rule (what waits for what), for the driver:
1. Plan once: the trainer computes `plan_buckets(manifest_of(...), bucket_bytes)`; the driver
   sends the plan to every engine, which calls `WeightReceiver.check(plan)`. The driver waits
   for all checks: a mismatch raises there, before any transfer starts.
2. Transfer: the driver starts `WeightSender.send(plan, tensors, version)` on the trainer and
   `WeightReceiver.receive(plan, version)` on every engine *concurrently* (each blocks inside
   collectives until all members of the group are in), then waits for all of them.
3. Every member walks the same bucket sequence. It begins with a handshake (one small
   all-reduce): each member reports whether it accepts the plan and a fingerprint of the plan
   and version; if any member rejects, or the fingerprints differ, every member raises before
   a byte of weights moves, so a missed step 1 gives errors, not a hang, and no model changes.
   A group with SGLang members (`GroupInfo.checked` False) has no handshake, since SGLang
   would take it for a bucket: there a receiver of ours that rejects the plan raises before
   any broadcast and leaves the others waiting in the first one until the group's timeout.
4. After the handshake, one broadcast per bucket from rank 0, in plan order. A member that
   fails mid-transfer (e.g. the sender's tensors do not match its own plan) leaves the others
   waiting in a broadcast until the group's timeout, which then raises there; an engine whose
   transfer failed holds a mix of old and new weights and must not serve until a sync succeeds.
The engine must not generate while it receives (SGLang: `/pause_generation` first).
"""

import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from weights.errors import WeightSyncError
from weights.manifest import Bucket, TensorSpec, check_manifest, plan_fingerprint, plan_specs
from weights.process_group import BroadcastGroup
from weights.runs import StreamItem, TensorRun

SENDER_RANK = 0
IN_FLIGHT = 2
"""Buckets the sender has on the wire or packed at once (double buffering)."""


@dataclass(frozen=True)
class SyncStats:
    """What one member did in one transfer."""

    version: int
    """Weight version transferred (on a receiver: the version now loaded)."""

    nbytes: int
    """Bytes of weights broadcast."""

    seconds: float
    """Wall time from the handshake to the last byte in place."""

    buckets: int
    """Broadcasts made (one per bucket)."""

    @property
    def gb_per_s(self) -> float:
        """Throughput in GB/s (10^9 bytes)."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


class WeightSender:
    """The trainer's side (rank 0 of the group)."""

    def __init__(self, group: BroadcastGroup):
        if group.rank != SENDER_RANK:
            raise WeightSyncError(f"the sender must be rank 0, not {group.rank}")
        self.group = group

    def send(
        self,
        plan: Sequence[Bucket],
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        version: int,
    ) -> SyncStats:
        """Broadcast `named_tensors` (in plan order, e.g. a lazy gather) bucket by bucket.

        `named_tensors` may hold `TensorRun`s (an MoE layer's experts), packed as one piece.
        Each bucket is packed into one of two reusable byte buffers (the only extra memory
        held), then its broadcast is started; bucket k+1 is packed while bucket k is on the
        wire, and bucket k's broadcast is waited for before its buffer takes bucket k+2. A
        bucket of one contiguous tensor already on the group's device is sent in place.
        Returns when every bucket has left (NCCL: when the GPU is done).
        """
        start = time.perf_counter()
        if self.group.info.checked:
            _handshake(self.group, plan, version, None)
        in_flight: deque = deque()
        for packed in packed_buckets(plan, named_tensors, self.group.device, IN_FLIGHT):
            in_flight.append(self.group.start_broadcast(packed))
            if len(in_flight) == IN_FLIGHT:
                in_flight.popleft()()  # its buffer is packed again next
        for wait in in_flight:
            wait()
        return _finish(self.group, plan, version, start)


def packed_buckets(
    plan: Sequence[Bucket],
    stream: Iterable[StreamItem],
    device: torch.device,
    buffers: int = 1,
) -> Iterator[torch.Tensor]:
    """Each non-empty bucket of `plan` as one flat byte tensor on `device`, packed from
    `stream` ((name, tensor) pairs and `TensorRun`s, checked against the plan as read).

    Packing is one `torch.cat` per bucket into a staging buffer, or nothing when the bucket is
    one contiguous tensor (or run slice) already on `device`. `buffers` staging buffers are
    used in turn: a yielded buffer is packed again `buffers` buckets later, so the caller must
    be done with it (or have ordered its uses before, on the current stream) by then.
    """
    reader = _StreamReader(stream)
    stagings = [_Staging(device) for _ in range(buffers)]
    with torch.no_grad():
        for index, bucket in enumerate(plan):
            staging = stagings[index % buffers]
            packed = _pack(bucket, reader.take(bucket.specs), staging, device)
            if packed.numel():
                yield packed
    if not reader.exhausted():
        raise WeightSyncError("the sender was given more tensors than its plan holds")


class WeightReceiver:
    """An engine worker's side: writes incoming weights into its model's tensors in place."""

    def __init__(self, group: BroadcastGroup, destinations: Mapping[str, torch.Tensor]):
        """`destinations`: tensors to overwrite, by name: `dict(model.named_parameters())`."""
        if group.rank == SENDER_RANK:
            raise WeightSyncError("rank 0 is the sender; a receiver needs rank_offset >= 1")
        self.group = group
        self.destinations = destinations
        self.version: int | None = None
        """The weight version loaded by the last successful `receive` (None before one)."""

    def check(self, plan: Sequence[Bucket]) -> None:
        """Raise `WeightSyncError` unless the plan carries exactly this model's tensors."""
        check_manifest(_specs_of(self.destinations), plan_specs(plan))

    def receive(self, plan: Sequence[Bucket], version: int) -> SyncStats:
        """Receive every bucket of `plan` and copy it into the destinations; record `version`.

        Checks the manifest first: on a mismatch it raises (after telling the group, so that no
        member waits for data; in an unchecked group it cannot tell) and leaves the model
        untouched. A bucket of one tensor is received straight into it when it is contiguous
        and on the group's device.
        """
        start = time.perf_counter()
        if self.group.info.checked:
            _handshake(self.group, plan, version, self._problem_with(plan))
        else:
            self.check(plan)
        staging = _Staging(self.group.device)
        with torch.no_grad():
            for bucket in plan:
                self._receive_bucket(bucket, staging)
        stats = _finish(self.group, plan, version, start)
        self.version = version
        return stats

    def _problem_with(self, plan: Sequence[Bucket]) -> WeightSyncError | None:
        """What `check` would raise, returned instead, for the handshake to report."""
        try:
            self.check(plan)
        except WeightSyncError as e:
            return e
        return None

    def _receive_bucket(self, bucket: Bucket, staging: "_Staging") -> None:
        if bucket.nbytes == 0:
            return
        dests = [self.destinations[spec.name].data for spec in bucket.specs]
        if len(dests) == 1 and _sendable_in_place(dests[0], self.group.device):
            self.group.broadcast(_bytes_of(dests[0]), src=SENDER_RANK)
            return
        buffer = staging.take(bucket.nbytes)
        self.group.broadcast(buffer, src=SENDER_RANK)
        _unpack(buffer.split(bucket.sizes), dests)


class _Staging:
    """One byte buffer reused by every bucket of a transfer, grown when a bucket needs more."""

    def __init__(self, device: torch.device):
        self._device = device
        self._buffer = torch.empty(0, dtype=torch.uint8, device=device)

    def take(self, nbytes: int) -> torch.Tensor:
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(0, dtype=torch.uint8, device=self._device)  # free first
            self._buffer = torch.empty(nbytes, dtype=torch.uint8, device=self._device)
        return self._buffer[:nbytes]


def _handshake(
    group: BroadcastGroup, plan: Sequence[Bucket], version: int, problem: WeightSyncError | None
) -> None:
    """All members meet in one all-reduce of (rejected?, plan fingerprint) rows; see rule 3."""
    table = torch.zeros(group.world_size, 2, dtype=torch.int64)
    table[group.rank, 0] = int(problem is not None)
    table[group.rank, 1] = plan_fingerprint(plan, version)
    table = table.to(group.device)
    group.all_reduce_sum(table)
    rejected, fingerprints = (col.tolist() for col in table.cpu().unbind(1))
    if problem is not None:
        raise problem
    where = f"weight sync to version {version} in {group.info.describe()}"
    if any(rejected):
        bad = [rank for rank, flag in enumerate(rejected) if flag]
        raise WeightSyncError(f"{where}: rank(s) {bad} rejected the manifest; nothing was sent")
    differing = [rank for rank, fp in enumerate(fingerprints) if fp != fingerprints[SENDER_RANK]]
    if differing:
        raise WeightSyncError(
            f"{where}: rank(s) {differing} hold a different plan or version than the sender; "
            f"hand every member the sender's plan and version; nothing was sent"
        )


class _StreamReader:
    """Hands out the stream's tensors bucket by bucket, cutting runs at bucket edges."""

    def __init__(self, stream: Iterable[StreamItem]):
        self._items = iter(stream)
        self._run: TensorRun | None = None
        self._offset = 0  # rows of `_run` already handed out

    def take(self, specs: Sequence[TensorSpec]) -> list[torch.Tensor]:
        """The next tensors of the stream, as many as `specs` (a run slice counts for its
        rows), each checked against its spec."""
        out = []
        i = 0
        while i < len(specs):
            if self._run is None:
                item = next(self._items, None)
                if item is None:
                    raise WeightSyncError(
                        f"the sender's tensors ran out before {specs[i].name!r} of its plan"
                    )
                if not isinstance(item, TensorRun):
                    _check_tensor(*item, specs[i])
                    out.append(item[1])
                    i += 1
                    continue
                self._run, self._offset = item, 0
            run, start = self._run, self._offset
            count = min(len(run) - start, len(specs) - i)
            rows = run.stacked[start : start + count]
            _check_run(run.names[start : start + count], rows, specs[i : i + count])
            out.append(rows)
            i += count
            self._offset += count
            if self._offset == len(run):
                self._run = None
        return out

    def exhausted(self) -> bool:
        return self._run is None and next(self._items, None) is None


def _check_tensor(name: str, tensor: torch.Tensor, spec: TensorSpec) -> None:
    if name != spec.name or tensor.dtype != spec.torch_dtype or tensor.shape != spec.shape:
        raise WeightSyncError(
            f"the sender's tensor {name!r} {TensorSpec.of(name, tensor).describe()} is not "
            f"the plan's {spec.name!r} {spec.describe()}: plan from the tensors you send"
        )


def _check_run(names: tuple[str, ...], rows: torch.Tensor, specs: Sequence[TensorSpec]) -> None:
    """Checked as a whole (one comparison of names, one of dtype), per tensor on a mismatch."""
    shape = rows.shape[1:]
    if (
        names == tuple(spec.name for spec in specs)
        and rows.dtype == specs[0].torch_dtype
        and all(spec.shape == shape for spec in specs)
    ):
        return
    for name, tensor, spec in zip(names, rows.unbind(0), specs, strict=True):
        _check_tensor(name, tensor, spec)


def _pack(
    bucket: Bucket, tensors: list[torch.Tensor], staging: _Staging, device: torch.device
) -> torch.Tensor:
    """The bucket's bytes: the lone tensor itself when it can go in place, else a packed copy."""
    if len(tensors) == 1 and _sendable_in_place(tensors[0], device):
        return _bytes_of(tensors[0])
    buffer = staging.take(bucket.nbytes)
    parts = [_bytes_of(t) if t.device == device else _bytes_of(t).to(device) for t in tensors]
    torch.cat(parts, out=buffer)  # one call for the bucket, not one copy per tensor
    return buffer


def _unpack(pieces: Sequence[torch.Tensor], dests: list[torch.Tensor]) -> None:
    """Copy each byte piece into its destination tensor (any device, any layout)."""
    flat = [i for i, dest in enumerate(dests) if dest.is_contiguous()]
    _copy_all([_bytes_of(dests[i]) for i in flat], [pieces[i] for i in flat])
    for i in sorted(set(range(len(dests))) - set(flat)):  # rare: through a temporary
        tmp = torch.empty(dests[i].shape, dtype=dests[i].dtype, device=pieces[i].device)
        _bytes_of(tmp).copy_(pieces[i])
        dests[i].copy_(tmp)


def _copy_all(dests: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """`dest.copy_(source)` for every pair.

    The one private torch name of the weight path: `torch._foreach_copy_` does all the copies
    in one fused launch on a GPU, where a `copy_` per tensor costs a kernel launch each (a
    Qwen3-30B-A3B checkpoint has about 19k tensors). It means exactly the loop it replaces.
    """
    torch._foreach_copy_(dests, sources)


def _sendable_in_place(tensor: torch.Tensor, device: torch.device) -> bool:
    return tensor.is_contiguous() and tensor.device == device


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a tensor's data (a copy only if it is not contiguous)."""
    return tensor.reshape(-1).view(torch.uint8)


def _specs_of(destinations: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec.of(name, tensor) for name, tensor in destinations.items()]


def _finish(group: BroadcastGroup, plan: Sequence[Bucket], version: int, start: float) -> SyncStats:
    if group.device.type == "cuda":
        torch.cuda.synchronize(group.device)
    seconds = time.perf_counter() - start
    return SyncStats(version, sum(b.nbytes for b in plan), seconds, len(plan))
