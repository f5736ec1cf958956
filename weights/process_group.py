"""The weight-broadcast group: the trainer (rank 0) and every engine worker, nothing else.

It is built from a `TCPStore` hosted by the trainer and a backend object (gloo or NCCL)
constructed directly, so it neither needs nor touches torch.distributed's default process group:
a DDP trainer keeps its own, an engine may have none. Only public torch names are used
(`TCPStore`, `PrefixStore`, `ProcessGroupGloo`, `ProcessGroupNCCL`, the `*Options` classes); the
collectives are called on the backend object, since `torch.distributed.broadcast` would look the
group up in the default group's registry.

The join mirrors SGLang's `POST /init_weights_update_group` (master_address, master_port,
rank_offset, world_size, group_name, backend): the trainer picks the address and port
(`pick_master_address_and_port`) and joins as rank 0; each engine worker joins as its
`rank_offset` (plus its local index when one engine spans several GPUs).

An SGLang server can be a member. It joins through `init_custom_process_group`, which opens a
`TCPStore` client at `tcp://master_address:master_port` and hands torch's
`_new_process_group_helper` the store `PrefixStore(group_name, tcp)`; torch then wraps that in
`PrefixStore(f"{group_name}/", ...)` and, per device the backend serves, in
`PrefixStore(f"{device}/", ...)` (`cpu` for gloo, `cuda` for NCCL) before it builds the backend.
Every member here builds its backend on the same chain (`_backend_store`), so the backend's keys
read `{group_name}/{group_name}//{device}//<key>` in the trainer's store on every member, ours
and SGLang's alike. A group with SGLang members must be `checked=False` (see `GroupInfo.checked`).
"""

import datetime
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import ray.util
import torch
import torch.distributed as dist

from weights.errors import WeightSyncError

DEFAULT_GROUP_NAME = "weight_update_group"
"""SGLang's default `group_name`."""

Backend = Literal["gloo", "nccl"]
CPU = torch.device("cpu")

_STORE_DEVICE: dict[Backend, str] = {"gloo": "cpu", "nccl": "cuda"}
"""The device torch names a backend's store keys after (`Backend.backend_capability[b][0]`)."""


@dataclass(frozen=True)
class GroupInfo:
    """Where and how to join a weight-broadcast group: made by the trainer, sent to engines."""

    master_address: str
    """IP of the trainer's node, where the rendezvous store listens."""

    master_port: int
    """TCP port of the rendezvous store."""

    world_size: int
    """1 (the trainer) + the number of engine workers."""

    group_name: str = DEFAULT_GROUP_NAME
    """Name of the group; prefixes every store key, so several groups never mix."""

    backend: Backend = "gloo"
    """`nccl` (CUDA tensors) or `gloo` (CPU tensors)."""

    timeout_s: float = 300.0
    """How long joining, and each collective, may wait for a peer before failing."""

    checked: bool = True
    """True: every member is Sluice code, so joining waits on a join check (naming the missing
    ranks on a timeout) and a warm-up all-reduce, and every transfer opens with a handshake
    all-reduce. False: some members are SGLang servers, which join and receive with plain
    collectives (one broadcast per bucket), so none of those extra collectives may run: a
    collective that an SGLang member never calls would pair with its next broadcast."""

    def describe(self) -> str:
        """Names the group in error messages."""
        return (
            f"weight group {self.group_name!r} at {self.master_address}:{self.master_port} "
            f"(world size {self.world_size}, {self.backend})"
        )


def pick_master_address_and_port() -> tuple[str, int]:
    """This node's IP (as Ray sees it) and a TCP port free on it now.

    Call it in the process that will join as rank 0, right before the join: the port is
    released when this returns and bound again by the store, a short window in which another
    process could take it (the join then fails with "address already in use").
    """
    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return address, port


class _Collectives(Protocol):
    """What we call on `ProcessGroupGloo` / `ProcessGroupNCCL` (their common base is private)."""

    def broadcast(self, tensors: list[torch.Tensor], opts: dist.BroadcastOptions) -> dist.Work:
        """Start a broadcast."""
        ...

    def allreduce(self, tensors: list[torch.Tensor], opts: dist.AllreduceOptions) -> dist.Work:
        """Start an all-reduce."""
        ...

    def shutdown(self) -> None:
        """Close the connections."""
        ...


class BroadcastGroup:
    """One member's handle on a joined group; collectives block until every member joins in."""

    def __init__(self, info: GroupInfo, rank: int, store: dist.Store, backend: _Collectives):
        self.info = info
        self.rank = rank
        self._store = store  # rank 0 hosts the store: it must live as long as the group
        self._backend = backend
        self.device = _device_of(info.backend)  # where transfer buffers live (GPU for NCCL)

    @property
    def world_size(self) -> int:
        """Members of the group, the trainer included."""
        return self.info.world_size

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Send `tensor` from rank `src` into every other member's `tensor` (same size)."""
        self.start_broadcast(tensor, src)()

    def start_broadcast(self, tensor: torch.Tensor, src: int = 0) -> Callable[[], None]:
        """Start `broadcast` and return its wait: until the wait returns (NCCL: until work
        queued after it on the current stream), `tensor` must be neither freed nor written."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        work = self._backend.broadcast([tensor], opts)
        return lambda: self._wait(work, "broadcast")

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over all members, in place on each."""
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        self._wait(self._backend.allreduce([tensor], opts), "all-reduce")

    def close(self) -> None:
        """Release the backend's connections (SGLang: `/destroy_weights_update_group`)."""
        self._backend.shutdown()
        self._store = None

    def _wait(self, work: dist.Work, what: str) -> None:
        # gloo blocks here and raises on timeout; NCCL only orders the current stream after the
        # collective (its watchdog enforces the timeout).
        try:
            work.wait()
        except RuntimeError as e:
            raise WeightSyncError(
                f"{what} in {self.info.describe()} failed on rank {self.rank}: {e}"
            ) from e


def init_weights_update_group(info: GroupInfo, rank: int) -> BroadcastGroup:
    """Join the group as `rank` (0 = the trainer, which hosts the store) and return the handle.

    Every member must call this concurrently: each blocks until all `world_size` members have
    joined, or raises `WeightSyncError` naming the group and the missing ranks after
    `info.timeout_s`. The driver therefore starts the trainer's and all engines' calls, then
    waits for all of them. A CUDA engine must select its GPU (`torch.cuda.set_device`) first.

    With `info.checked` False (SGLang members) there is no join check and no warm-up: gloo still
    blocks here until every member is connected (its error then names no ranks), while NCCL
    connects in the first broadcast, as SGLang's own group does.
    """
    if not 0 <= rank < info.world_size:
        raise WeightSyncError(f"rank {rank} is outside {info.describe()}")
    store = _open_store(info, rank)
    if info.checked:
        _wait_for_members(store, info, rank)
    group = BroadcastGroup(info, rank, store, _make_backend(store, info, rank))
    if info.checked:
        group.all_reduce_sum(torch.zeros(1, device=group.device))  # NCCL connects here, not later
    return group


def _open_store(info: GroupInfo, rank: int) -> dist.TCPStore:
    try:
        return dist.TCPStore(
            info.master_address,
            info.master_port,
            info.world_size,
            is_master=rank == 0,
            timeout=_timedelta(info),
            wait_for_workers=False,  # _wait_for_members waits, with a better error
        )
    except dist.DistError as e:
        verb = "host" if rank == 0 else "reach"
        raise WeightSyncError(
            f"rank {rank} could not {verb} the rendezvous store of {info.describe()}: {e}"
        ) from e


def _wait_for_members(store: dist.Store, info: GroupInfo, rank: int) -> None:
    joined = dist.PrefixStore(f"sluice-joined/{info.group_name}", store)
    joined.set(str(rank), "1")
    keys = [str(r) for r in range(info.world_size)]
    try:
        joined.wait(keys, _timedelta(info))
    except dist.DistError as e:
        missing = _missing_ranks(joined, keys)
        raise WeightSyncError(
            f"{info.describe()}: rank(s) {missing} did not join within {info.timeout_s:g} s "
            f"(this is rank {rank}); every engine must call init_weights_update_group with its "
            f"rank_offset while the trainer joins as rank 0"
        ) from e


def _missing_ranks(joined: dist.Store, keys: list[str]) -> list[int] | str:
    try:
        return [int(k) for k in keys if not joined.check([k])]
    except dist.DistError:
        return "unknown (the store is gone)"


def _make_backend(store: dist.Store, info: GroupInfo, rank: int) -> _Collectives:
    """The backend object, on the store prefix chain SGLang's members use (module docstring)."""
    keys = _backend_store(store, info)
    try:
        if info.backend == "nccl":
            return dist.ProcessGroupNCCL(keys, rank, info.world_size, _timedelta(info))
        return dist.ProcessGroupGloo(keys, rank, info.world_size, _timedelta(info))
    except RuntimeError as e:  # gloo connects here: a missing peer times out
        raise WeightSyncError(
            f"rank {rank} could not connect to the other members of {info.describe()}: {e}"
        ) from e


def _backend_store(store: dist.Store, info: GroupInfo) -> dist.Store:
    """`store` wrapped exactly as SGLang's `init_custom_process_group` and torch wrap it.

    SGLang: `PrefixStore(group_name, store)`; torch's `_new_process_group_helper`: then
    `PrefixStore(f"{group_name}/", ...)` and `PrefixStore(f"{device}/", ...)`, where `device` is
    the first device the backend serves (gloo: `cpu`, NCCL: `cuda`).
    """
    sglang = dist.PrefixStore(info.group_name, store)
    torch_group = dist.PrefixStore(f"{info.group_name}/", sglang)
    return dist.PrefixStore(f"{_STORE_DEVICE[info.backend]}/", torch_group)


def _device_of(backend: Backend) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else CPU


def _timedelta(info: GroupInfo) -> datetime.timedelta:
    return datetime.timedelta(seconds=info.timeout_s)
