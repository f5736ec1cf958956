"""`WeightSync.rebuild` after an engine restart: both sides leave the old group at once, with a
deadline, and the new group has a name of its own.

1. The ordering, with actors that leave as NCCL members do: each side's teardown waits for the
   other members (SGLang's `/destroy_weights_update_group` calls `ProcessGroupNCCL.shutdown()`),
   so a driver that waited for the engines before telling the trainer would hang. These are Ray
   actors with the verbs of TrainActor and RolloutActor and nothing else of the weight path.
2. The whole path on gloo: a real TrainActor (torch backend) broadcasts into a real
   `SglangEngine` whose server is `tests/sglang_receiver.py` (a recording test double of
   SGLang's routes, NOT SGLang, that joins, receives and leaves with SGLang's own
   `WeightUpdater`); the server is killed, the engine restarts it, the driver's
   `WeightSync.rebuild` builds a group under a new name, and the next version arrives bit for
   bit; then a rebuild with every member alive, where SGLang's own destroy runs.
"""

import hashlib
import sys
import time
from types import SimpleNamespace

import pytest
import ray
import requests
import torch

import driver
from actors.train_actor import TrainActor
from actors.weight_sync import WeightSync, group_name
from config.schema import WeightSyncConfig
from inference.sglang.engine import EngineSite, SglangEngine
from models.tiny import save_tiny_model
from placement.planner import ClusterShape, NodeShape, plan_layout
from weights.errors import WeightSyncError


@ray.remote(num_cpus=0)
class Leaving:
    """Counts the members that have started leaving the group."""

    def __init__(self):
        self.started = 0

    def start(self) -> None:
        self.started += 1

    def count(self) -> int:
        return self.started


@ray.remote(num_cpus=0, max_concurrency=2)
class Member:
    """A trainer or an engine of the group: leaving blocks until all `members` have begun
    (`stuck`: never finishes)."""

    def __init__(self, leaving, members: int, stuck: bool = False):
        self.leaving, self.members, self.stuck = leaving, members, stuck
        self.joined: list = []

    def _leave(self) -> None:
        ray.get(self.leaving.start.remote())
        while self.stuck or ray.get(self.leaving.count.remote()) < self.members:
            time.sleep(0.05)

    # The trainer's verbs.
    def close_weights_update_group(self) -> None:
        self._leave()

    def pick_master(self):
        return "127.0.0.1", 1

    def weight_plan(self, bucket_bytes: int):
        return []

    # The engine's verbs.
    def destroy_weights_update_group(self) -> None:
        self._leave()

    def weight_ranks(self) -> int:
        return 1

    def init_weights_update_group(self, info, rank_offset=None) -> None:
        self.joined.append(info.group_name)

    def groups_joined(self) -> list:
        return self.joined


@pytest.fixture(scope="module")
def ray_local():
    # "local": a fresh cluster, never one another test file (another xdist worker) runs.
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="weight_group_rebuild")
    yield
    ray.shutdown()


def weight_sync(trainer, engines, timeout_s: float) -> WeightSync:
    layout = SimpleNamespace(colocate=False, use_gpus=False, engine_slots=[[]] * len(engines))
    config = WeightSyncConfig(backend="gloo", timeout_s=timeout_s)
    trainers = SimpleNamespace(leader=trainer)
    return WeightSync(config, trainers, SimpleNamespace(actors=engines), layout)


def test_rebuild_leaves_on_both_sides_at_once_and_names_the_new_group(ray_local):
    leaving = Leaving.remote()
    trainer, *engines = [Member.remote(leaving, members=3) for _ in range(3)]
    sync = weight_sync(trainer, engines, timeout_s=30)
    sync.setup()
    sync.rebuild()  # waiting for the engines first would never return
    sync.rebuild()
    assert ray.get(leaving.count.remote()) == 6
    expected = [group_name(0), group_name(1), group_name(2)]
    assert expected == ["weight_update_group", "weight_update_group_1", "weight_update_group_2"]
    for engine in engines:
        assert ray.get(engine.groups_joined.remote()) == expected


def test_a_member_that_never_leaves_is_named_after_the_deadline(ray_local):
    leaving = Leaving.remote()
    trainer = Member.remote(leaving, members=2)
    stuck = Member.remote(leaving, members=2, stuck=True)
    sync = weight_sync(trainer, [stuck], timeout_s=8.0)  # ample for the trainer to leave
    sync.setup()
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match=r": engine 0 did not finish within "
                       r"weight_sync.timeout_s=8 s"):  # fmt: skip
        sync.rebuild()
    assert time.monotonic() - start < 30
    ray.kill(stuck)


# ---- 2. the whole path on gloo, SGLang's WeightUpdater receiving ---------------------------

RECEIVER = [sys.executable, "-W", "ignore", "-m", "tests.sglang_receiver"]


@ray.remote(num_cpus=0)
class EngineActor:
    """The real `SglangEngine` in a Ray actor, with the verbs RolloutActor delegates to it
    (RolloutActor builds its engine from the config alone; this one is given the double)."""

    def __init__(self, config, site: EngineSite):
        self.engine = SglangEngine(config, 0, site, RECEIVER)

    def weight_ranks(self) -> int:
        return self.engine.weight_ranks

    def init_weights_update_group(self, info, rank_offset: int) -> None:
        self.engine.init_weights_update_group(info, rank_offset)

    def destroy_weights_update_group(self) -> None:
        self.engine.destroy_weights_update_group()

    def check_weights_update(self, plan) -> None:
        self.engine.check_weights_update(plan)

    def update_weights_from_distributed(self, plan, version: int):
        return self.engine.update_weights_from_distributed(plan, version)

    def weight_version(self) -> int:
        return self.engine.weight_version

    def ensure_running(self) -> bool:
        return self.engine.ensure_running()

    def crash(self) -> None:
        self.engine.local._process.kill()
        self.engine.local._process.wait()

    def server(self, route: str):
        return requests.get(f"{self.engine.url}{route}", timeout=30).json()

    def shutdown(self) -> None:
        self.engine.shutdown()


def test_a_restarted_engine_rejoins_a_new_group_and_gets_the_next_version(ray_local, tmp_path):
    model_dir = tmp_path / "model"
    save_tiny_model(model_dir, 0)
    config, _ = driver.parse_args(
        ["--rollout.engine", "sglang", "--model.hf_checkpoint", str(model_dir),
         "--train.num_workers", "1", "--rollout.num_engines", "1", "--rollout.batch_size", "8",
         "--weight_sync.backend", "gloo", "--weight_sync.timeout_s", "120",
         "--logging.output_dir", str(tmp_path), "--rollout.sglang.startup_timeout_s", "120"]
    )  # fmt: skip
    node = NodeShape(node_id="f" * 56, address="127.0.0.1", num_gpus=2, num_cpus=8.0)
    layout = plan_layout(ClusterShape((node,)), config)
    engine = EngineActor.remote(config, EngineSite(layout, gpu_ids=[[1]], node_options=[{}]))
    trainer = ray.remote(num_cpus=0)(TrainActor).remote(config, 0, 1)
    try:
        ray.get(trainer.init_process_group.remote(*ray.get(trainer.pick_master.remote())))

        # TrainGroup's two verbs that WeightSync uses, for its one rank.
        def broadcast(plan, version):
            return [trainer.broadcast_weights.remote(plan, version)]

        trainers = SimpleNamespace(leader=trainer, broadcast_weights=broadcast)
        engines = SimpleNamespace(actors=[engine])
        sync = WeightSync(config.weight_sync, trainers, engines, layout, "sglang")
        sent = {
            name: hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
            for name, t in ray.get(trainer.named_weights.remote()).items()
        }
        sync.setup()
        sync.sync(1)
        assert ray.get(engine.server.remote("/_received")) == sent

        ray.get(engine.crash.remote())
        assert ray.get(engine.ensure_running.remote()) is True  # a fresh server, in no group
        sync.rebuild()
        sync.sync(2)
        assert ray.get(engine.weight_version.remote()) == 2
        assert ray.get(engine.server.remote("/_received")) == sent  # the new server got it all

        sync.rebuild()  # every member alive: SGLang's own destroy, at once with the trainer's
        sync.sync(3)
        calls = ray.get(engine.server.remote("/_recorded"))
        joined = [c["body"]["group_name"] for c in calls if c["path"].startswith("/init_w")]
        left = [c["body"]["group_name"] for c in calls if c["path"].startswith("/destroy_w")]
        assert joined == [group_name(1), group_name(2)] and left == [group_name(1)]
        assert ray.get(engine.server.remote("/model_info"))["weight_version"] == "3"
    finally:
        ray.get(engine.shutdown.remote())
