"""`WeightSync.rebuild` after an engine restart: both sides leave the old group at once, with a
deadline, and the new group has a name of its own.

Under NCCL, each side's teardown of a group waits for the other members (SGLang's
`/destroy_weights_update_group` calls `ProcessGroupNCCL.shutdown()`): the actors below leave
the same way, each blocking until every member has started leaving, so a driver that waited for
the engines before telling the trainer would hang. They are Ray actors with the verbs the real
TrainActor and RolloutActor expose; nothing else of the weight path runs here (the broadcasts
themselves are tests/test_weight_sync.py's and tests/test_sglang_weight_group.py's).
"""

import time
from types import SimpleNamespace

import pytest
import ray

from actors.weight_sync import WeightSync, group_name
from config.schema import WeightSyncConfig
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
    ray.init(num_cpus=2, include_dashboard=False, namespace="weight_group_rebuild")
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
