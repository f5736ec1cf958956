"""`WeightSync.sync(version)`: the trainer's new weights into every engine, checked.

What waits for what:
1. `setup()` (once): the trainer leader picks the group's address and port; the leader and every
   engine join the broadcast group concurrently (each blocks until all have joined).
2. `sync(version)`: the leader plans the buckets; every engine checks the plan against its own
   weights and the driver waits for all checks, so a name, dtype or shape mismatch fails here
   with the engine still on its old weights. Then the leader's broadcast and every engine's
   receive run concurrently; the driver waits for all of them and checks that every engine
   reports `version`. With `verify`, checksums of both sides are compared afterwards.
The driver never calls `sync` while engines generate (the loop is synchronous).
"""

import ray

from actors.groups import RolloutGroup, TrainGroup
from config.errors import UserError
from config.schema import WeightSyncConfig
from placement.planner import Layout
from weights.checksum import compare_checksums
from weights.errors import WeightSyncError
from weights.process_group import GroupInfo
from weights.sync import SyncStats


class WeightSync:
    def __init__(
        self, config: WeightSyncConfig, trainers: TrainGroup, engines: RolloutGroup, layout: Layout
    ):
        self.config = config
        self.backend = transport_backend(config, layout.use_gpus, layout.colocate)
        self.trainers = trainers
        self.leader = trainers.leader
        self.engines = engines.actors
        self.plan = None

    def setup(self) -> None:
        address, port = ray.get(self.leader.pick_master.remote())
        info = GroupInfo(
            master_address=address,
            master_port=port,
            world_size=1 + len(self.engines),
            backend=self.backend,
            timeout_s=self.config.timeout_s,
        )
        joins = [self.leader.init_weights_update_group.remote(info)]
        joins += [
            e.init_weights_update_group.remote(info, 1 + i) for i, e in enumerate(self.engines)
        ]
        ray.get(joins)
        self.plan = ray.get(self.leader.weight_plan.remote(self.config.bucket_size_mb << 20))

    def sync(self, version: int) -> SyncStats:
        ray.get([e.check_weights_update.remote(self.plan) for e in self.engines])
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

    def verify(self) -> None:
        """Compare bit-exact checksums of the trainer's and every engine's weights."""
        expected = self.trainers.weight_checksums()
        for i, sums in enumerate(ray.get([e.weight_checksums.remote() for e in self.engines])):
            compare_checksums(expected, sums, where=f"engine {i}")


def transport_backend(config: WeightSyncConfig, use_gpus: bool, colocate: bool) -> str:
    """`weight_sync.backend` resolved for this layout.

    NCCL cannot put two ranks of one communicator on the same GPU, which is exactly what a
    colocated trainer and engine are; they use gloo (through host memory) until the CUDA-IPC
    transport for colocated engines lands.
    """
    if config.backend == "auto":
        return "nccl" if use_gpus and not colocate else "gloo"
    if config.backend == "nccl" and (colocate or not use_gpus):
        raise UserError(
            "weight_sync.backend=nccl needs trainers and engines on distinct GPUs "
            "(placement.colocate=false on a GPU cluster); use auto or gloo"
        )
    return config.backend
