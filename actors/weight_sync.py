"""`WeightSync.sync(version)`: the trainer's new weights into every engine, checked.

What waits for what:
1. `setup()` (once): the trainer leader picks the group's address and port; the leader and every
   engine join the broadcast group concurrently (each blocks until all have joined).
2. `sync(version)`: the leader plans the buckets; every engine checks the plan against its own
   weights and the driver waits for all checks, so a name, dtype or shape mismatch fails here
   with the engine still on its old weights. Then the leader's broadcast and every engine's
   receive run concurrently; the driver waits for all of them and checks that every engine
   reports `version`. With `verify`, checksums of both sides are compared afterwards.
   With the `ipc` transport (engines on the trainers' GPUs) there is no group: per bucket,
   every training rank takes part in the export, the serving ranks (`handle_sources`) return
   CUDA IPC handles, and the driver hands every engine its handles and waits for all of them
   (each has copied the bucket out) before the next bucket.
The driver never calls `sync` while engines generate (the loop is synchronous).
"""

import time

import ray

from actors.groups import RolloutGroup, TrainGroup
from config.errors import UserError
from config.schema import WeightSyncConfig
from placement.planner import Layout
from weights.checksum import compare_checksums
from weights.errors import WeightSyncError
from weights.process_group import DEFAULT_GROUP_NAME, GroupInfo
from weights.sync import SyncStats


class WeightSync:
    def __init__(
        self,
        config: WeightSyncConfig,
        trainers: TrainGroup,
        engines: RolloutGroup,
        layout: Layout,
        engine_type: str = "transformers",
    ):
        self.config = config
        self.backend = transport_backend(config, layout, engine_type)
        self.trainers = trainers
        self.leader = trainers.leader
        self.engines = engines.actors
        self.plan = None
        self.handle_sources = (
            handle_sources(layout, engine_type)
            if self.backend == "ipc"
            else [{} for _ in layout.engine_slots]
        )
        """Per engine, {node index: the training rank whose CUDA IPC handles it opens}."""
        self.serving_ranks = sorted(
            {r for sources in self.handle_sources for r in sources.values()}
        )
        """The training ranks that pack buckets and serve handles (ipc transport)."""
        # SGLang servers join and receive with plain collectives: no join check, warm-up or
        # per-sync handshake may run in a group that has them (see GroupInfo.checked).
        self.checked = engine_type != "sglang"
        self.generation = 0
        """How many times the group was rebuilt; part of its name."""

    def setup(self) -> None:
        """Build the group: the trainer leader is rank 0, engine e's ranks follow the previous
        engines' (an SGLang engine takes one rank per GPU: rank_offset + tp_rank)."""
        if self.backend == "ipc":
            self.plan = ray.get(self.leader.weight_plan.remote(self.config.bucket_size_mb << 20))
            return
        address, port = ray.get(self.leader.pick_master.remote())
        widths = ray.get([e.weight_ranks.remote() for e in self.engines])
        offsets = [1 + sum(widths[:i]) for i in range(len(widths))]
        info = GroupInfo(
            master_address=address,
            master_port=port,
            world_size=1 + sum(widths),
            backend=self.backend,
            group_name=group_name(self.generation),
            timeout_s=self.config.timeout_s,
            checked=self.checked,
        )
        joins = [self.leader.init_weights_update_group.remote(info)]
        joins += [
            e.init_weights_update_group.remote(info, offset)
            for e, offset in zip(self.engines, offsets, strict=True)
        ]
        ray.get(joins)
        self.plan = ray.get(self.leader.weight_plan.remote(self.config.bucket_size_mb << 20))

    def rebuild(self) -> None:
        """A new group after an engine restarted (a restarted server is in no group).

        Every engine leaves the old group while the trainer closes its end, all at once: under
        NCCL each side's shutdown waits for the others (SGLang's destroy calls
        `ProcessGroupNCCL.shutdown()`), so waiting for the engines before the trainer would
        hang. The teardown has `weight_sync.timeout_s`; the new group gets a name of its own,
        since torch refuses a name whose destroy failed. Then `setup` runs again."""
        if self.backend != "ipc":
            calls = {f"engine {i}": e.destroy_weights_update_group.remote()
                     for i, e in enumerate(self.engines)}  # fmt: skip
            calls["trainer"] = self.leader.close_weights_update_group.remote()
            _wait_all(calls, self.config.timeout_s, "leaving the old weight group")
        self.generation += 1
        self.setup()

    def sync(self, version: int) -> SyncStats:
        ray.get([e.check_weights_update.remote(self.plan) for e in self.engines])
        if self.backend == "ipc":
            stats = self._sync_by_handles(version)
        else:
            sent = self.trainers.broadcast_weights(self.plan, version)
            received = [
                e.update_weights_from_distributed.remote(self.plan, version) for e in self.engines
            ]
            stats = ray.get(sent)
            ray.get(received)
        versions = ray.get([e.weight_version.remote() for e in self.engines])
        if any(v != version for v in versions):
            raise WeightSyncError(
                f"engines report weight versions {versions} after syncing {version}"
            )
        if self.config.verify:
            self.verify()
        return stats

    def _sync_by_handles(self, version: int) -> SyncStats:
        start = time.perf_counter()
        sent = [b for b in self.plan if b.nbytes]
        self.trainers.begin_ipc_export(set(self.serving_ranks))
        for bucket in self.plan:
            handles = self.trainers.ipc_bucket(bucket)
            if not bucket.nbytes:
                continue
            last = bucket is sent[-1]
            ray.get(
                [
                    e.update_weights_from_tensor.remote(
                        {node: handles[rank] for node, rank in sources.items()},
                        version if last else None,
                    )
                    for e, sources in zip(self.engines, self.handle_sources, strict=True)
                ]
            )
        self.trainers.end_ipc_export()
        ray.get([e.finish_weight_update.remote(version) for e in self.engines])
        nbytes = sum(b.nbytes for b in self.plan)
        return SyncStats(version, nbytes, time.perf_counter() - start, len(sent))

    def verify(self) -> None:
        """Compare bit-exact checksums of the trainer's and every engine's weights."""
        expected = self.trainers.weight_checksums()
        for i, sums in enumerate(ray.get([e.weight_checksums.remote() for e in self.engines])):
            compare_checksums(expected, sums, where=f"engine {i}")


def group_name(generation: int) -> str:
    """SGLang's default name for the first group, a numbered one for each rebuilt group."""
    return DEFAULT_GROUP_NAME if generation == 0 else f"{DEFAULT_GROUP_NAME}_{generation}"


def _wait_all(calls: dict[str, ray.ObjectRef], timeout_s: float, what: str) -> None:
    """Wait for every call (raising the first error), or fail naming those still running."""
    refs = list(calls.values())
    done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        stuck = [name for name, ref in calls.items() if ref in pending]
        raise WeightSyncError(
            f"{what}: {', '.join(stuck)} did not finish within weight_sync.timeout_s="
            f"{timeout_s:g} s"
        )
    ray.get(done)


def handle_sources(layout: Layout, engine_type: str) -> list[dict[int, int]]:
    """Which training rank serves each engine its CUDA IPC handles, per node of the engine.

    Every training rank holds the whole gathered bucket during an export, so any rank on the
    engine's node could serve it. An SGLang server sees all of its node's GPUs: the first
    training rank of each node serves that node. The transformers engine is a Ray actor that
    sees only its own GPU, so it opens the handles of the training rank on that same GPU.
    """
    firsts: dict[int, int] = {}
    on_gpu: dict[tuple[int, int], int] = {}
    for rank, slot in enumerate(layout.train_slots):
        firsts.setdefault(slot.node_index, rank)
        on_gpu[slot.node_index, slot.bundle_index] = rank
    sources = []
    for engine, slots in enumerate(layout.engine_slots):
        if engine_type == "sglang":
            sources.append({s.node_index: firsts[s.node_index] for s in slots})
            continue
        (slot,) = slots  # the transformers engine spans one GPU
        if (slot.node_index, slot.bundle_index) not in on_gpu:
            raise UserError(
                f"engine {engine} shares no GPU with a training rank, so it cannot take CUDA "
                f"IPC handles: set weight_sync.backend=gloo"
            )
        sources.append({slot.node_index: on_gpu[slot.node_index, slot.bundle_index]})
    return sources


def transport_backend(config: WeightSyncConfig, layout: Layout, engine_type: str) -> str:
    """`weight_sync.backend` resolved for this layout.

    NCCL cannot put two ranks of one communicator on the same GPU, which is exactly what a
    colocated trainer and engine are: colocated engines take CUDA IPC handles instead (no
    copy between processes at all). gloo, through host memory, is there for CPUs.
    """
    colocate, use_gpus = layout.colocate, layout.use_gpus
    ipc_possible = colocate and use_gpus
    if config.backend == "auto":
        if ipc_possible:
            return "ipc"
        return "nccl" if use_gpus and not colocate else "gloo"
    if config.backend == "nccl" and (colocate or not use_gpus):
        raise UserError(
            "weight_sync.backend=nccl needs trainers and engines on distinct GPUs "
            "(placement.colocate=false on a GPU cluster); use auto or gloo"
        )
    if config.backend == "ipc" and not ipc_possible:
        raise UserError(
            "weight_sync.backend=ipc hands CUDA IPC handles to engines on the trainers' GPUs: "
            "it needs placement.colocate=true and GPUs; use auto"
        )
    return config.backend
