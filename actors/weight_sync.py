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
   every training rank takes part in the export, the rank on each engine rank's GPU
   (`handle_sources`) packs the bucket there and returns its CUDA IPC handle, and the driver
   hands every engine one handle per rank and waits for all of them (each has copied the
   bucket out) before the next bucket.
The driver never calls `sync` while engines generate. An engine that died is left out of the
group until it is back (`rebuild(members)`), so the others keep receiving updates meanwhile.
"""

import time

import ray

from actors import deadline
from actors.groups import RolloutGroup, TrainGroup
from config.errors import UserError
from config.schema import WeightSyncConfig
from placement.planner import Layout
from placement.transport import transport_backend
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
        self.engine_group = engines
        self.all_engines = engines.actors
        self.members = list(range(len(self.all_engines)))
        """The engines in the group (all, unless some were down when it was built)."""
        self.plan = None
        self.handle_sources = handle_sources(layout) if self.backend == "ipc" else []
        """Per engine, per engine rank: the training rank whose CUDA IPC handles it opens."""
        self.serving_ranks = sorted({r for sources in self.handle_sources for r in sources})
        """The training ranks that pack buckets and serve handles (ipc transport)."""
        # SGLang servers join and receive with plain collectives: no join check, warm-up or
        # per-sync handshake may run in a group that has them (see GroupInfo.checked).
        self.checked = engine_type != "sglang"
        self.generation = 0
        """How many times the group was rebuilt; part of its name."""

    @property
    def engines(self) -> list[ray.actor.ActorHandle]:
        return [self.all_engines[e] for e in self.members]

    def setup(self, members: list[int] | None = None) -> None:
        """Build the group of the trainer leader and the engines `members` (default: all).
        The leader is rank 0, each engine's ranks follow the previous engines' (an SGLang
        engine takes one rank per GPU: rank_offset + tp_rank)."""
        if members is not None:
            self.members = list(members)
        if self.backend == "ipc":
            self.plan = deadline.get(
                self.leader.weight_plan.remote(self.config.bucket_size_mb << 20)
            )
            return
        address, port = deadline.get(self.leader.pick_master.remote())
        widths = deadline.get([e.weight_ranks.remote() for e in self.engines])
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
        deadline.get(joins)
        self.plan = deadline.get(self.leader.weight_plan.remote(self.config.bucket_size_mb << 20))

    def rebuild(self, members: list[int] | None = None, trainers: TrainGroup | None = None) -> None:
        """A new group of the engines `members` (default: all) after an engine restarted (a
        restarted server is in no group), came back, or died (a dead member would fail the
        broadcast), or, given `trainers`, around a restarted training group's new leader.
        Members of the old group that are gone (a dead engine, a dead leader) are not asked
        to leave it.

        Every engine leaves the old group while the trainer closes its end, all at once: under
        NCCL each side's shutdown waits for the others (SGLang's destroy calls
        `ProcessGroupNCCL.shutdown()`), so waiting for the engines before the trainer would
        hang. The teardown has `weight_sync.timeout_s`; the new group gets a name of its own,
        since torch refuses a name whose destroy failed. Then `setup` runs again."""
        members = list(range(len(self.all_engines))) if members is None else members
        if self.backend != "ipc":
            calls = {f"engine {e}": self.all_engines[e].destroy_weights_update_group.remote()
                     for e in self.members if e in members}  # fmt: skip
            if trainers is None:
                calls["trainer"] = self.leader.close_weights_update_group.remote()
            _wait_all(calls, self.config.timeout_s, "leaving the old weight group")
        if trainers is not None:
            self.trainers, self.leader = trainers, trainers.leader
        self.generation += 1
        self.setup(members)

    def sync(self, version: int) -> SyncStats:
        """`version` into every engine of the group. An engine that dies or is stuck during
        the update costs only itself: it is killed if stuck (Ray restarts it), the group is
        rebuilt without it and the update is sent again to the others; it rejoins once back
        (`RolloutGroup.check_engines`). A trainer's failure is the caller's to handle."""
        lost_engines = False
        while True:  # each round loses an engine, so this ends
            try:
                if lost_engines:
                    self.rebuild(self.engine_group.live())
                return self._sync_once(version)
            except Exception as error:
                lost_engines = self._engines_lost(error)
                if not lost_engines:
                    raise

    def _engines_lost(self, error: Exception) -> bool:
        """Whether `error` came from engines that are now down: stuck ones (a phase timeout
        naming only engines) are killed; otherwise the members are probed for a death (a
        broadcast fails on every side when one member dies)."""
        if isinstance(error, deadline.PhaseTimeout):
            ids = {a._actor_id.hex(): e for e, a in enumerate(self.all_engines)}  # (no public id)
            if not error.stuck_actor_ids or not error.stuck_actor_ids <= ids.keys():
                return False
            for actor_id in error.stuck_actor_ids:
                ray.kill(self.all_engines[ids[actor_id]], no_restart=False)
                self.engine_group.went_down(ids[actor_id], f"weight update (stuck: {error})")
            deadline.renew()
            return True
        return bool(self.engine_group.dead_members(self.members))

    def _sync_once(self, version: int) -> SyncStats:
        if not self.members:  # every engine is down: they get the weights when back
            return SyncStats(version, 0, 0.0, 0)
        deadline.get([e.check_weights_update.remote(self.plan) for e in self.engines])
        if self.backend == "ipc":
            stats = self._sync_by_handles(version)
        else:
            sent = self.trainers.broadcast_weights(self.plan, version)
            received = [
                e.update_weights_from_distributed.remote(self.plan, version) for e in self.engines
            ]
            stats = deadline.get(sent)[0]
            deadline.get(received)
        versions = deadline.get([e.weight_version.remote() for e in self.engines])
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
            deadline.get(
                [
                    e.update_weights_from_tensor.remote(
                        [handles[rank] for rank in sources], version if last else None
                    )
                    for e, sources in zip(
                        self.engines, [self.handle_sources[m] for m in self.members], strict=True
                    )
                ]
            )
        self.trainers.end_ipc_export()
        deadline.get([e.finish_weight_update.remote(version) for e in self.engines])
        nbytes = sum(b.nbytes for b in self.plan)
        return SyncStats(version, nbytes, time.perf_counter() - start, len(sent))

    def verify(self) -> None:
        """Compare bit-exact checksums of the trainer's and every engine's weights."""
        expected = self.trainers.weight_checksums()
        sums_of_members = deadline.get([e.weight_checksums.remote() for e in self.engines])
        for member, sums in zip(self.members, sums_of_members, strict=True):
            compare_checksums(expected, sums, where=f"engine {member}")


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


def handle_sources(layout: Layout) -> list[list[int]]:
    """Per engine, per engine rank (SGLang's tp_rank; the transformers engine has one): the
    training rank on the same GPU, whose CUDA IPC handles that rank opens.

    Every training rank holds the whole gathered bucket during an export, so the rank sharing
    each engine rank's GPU packs its own copy there: every engine rank reads memory on its own
    GPU (SGLang's TP workers each open the handle at their own `tp_rank`; one buffer shared by
    a node would have 7 of 8 ranks read across GPUs and open a CUDA context on another GPU).
    """
    on_gpu = {(s.node_index, s.bundle_index): rank for rank, s in enumerate(layout.train_slots)}
    sources = []
    for engine, slots in enumerate(layout.engine_slots):
        missing = [s for s in slots if (s.node_index, s.bundle_index) not in on_gpu]
        if missing:
            where = ", ".join(f"node {s.node_index} GPU {s.gpu_index}" for s in missing)
            raise UserError(
                f"engine {engine} shares no GPU with a training rank at {where}, so it cannot "
                f"take CUDA IPC handles there: give every engine GPU a training rank "
                f"(colocated placement) or set weight_sync.backend=gloo"
            )
        sources.append([on_gpu[s.node_index, s.bundle_index] for s in slots])
    return sources
