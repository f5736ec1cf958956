"""Placement: the pure planner on synthetic clusters, then real placement groups and actors on
a fake-GPU local Ray (1 x 8) and a three-node `ray.cluster_utils.Cluster` (3 x 8).

Ray startups are the expensive part on a 2-core machine, so each Ray cluster lives in one
class-scoped fixture (class scope, not module scope: the local instance must be shut down
before the three-node cluster starts, and a module fixture would live until the file ends).
"""

import pytest
import ray
from ray.util.placement_group import placement_group_table

from config.errors import UserError
from config.schema import SluiceConfig
from placement.cluster import read_cluster_shape, synthetic_cluster
from placement.groups import (
    Placement,
    PlacementNotReady,
    Role,
    bundle_order_by_gpu,
    create_placement,
)
from placement.planner import ClusterShape, Layout, NodeShape, plan_layout

# --- helpers --------------------------------------------------------------------------------


def make_config(
    workers: int,
    engines: int,
    gpus_per_engine: int = 1,
    *,
    tensor: int = 1,
    colocate: bool = False,
    cpus_per_bundle: float = 1.0,
    use_gpus: str = "auto",
) -> SluiceConfig:
    config = SluiceConfig()
    config.train.num_workers = workers
    config.train.parallel.tensor = tensor
    config.rollout.num_engines = engines
    config.rollout.gpus_per_engine = gpus_per_engine
    config.placement.colocate = colocate
    config.placement.cpus_per_bundle = cpus_per_bundle
    config.placement.use_gpus = use_gpus
    return config.validate()


def check_invariants(layout: Layout, config: SluiceConfig) -> None:
    """What every plan must satisfy, whatever the cluster and config."""
    tensor = config.train.parallel.tensor
    order = lambda s: (s.node_index, s.bundle_index)  # noqa: E731
    # Bundles: each node's bundles are 0..n-1, ordered by GPU (bundle i = GPU i in GPU mode).
    used = {order(s) for s in layout.train_slots} | {
        order(s) for slots in layout.engine_slots for s in slots
    }
    expected = {(k, b) for k, n in enumerate(layout.bundles_per_node) for b in range(n)}
    assert used == expected
    for s in [*layout.train_slots, *(s for slots in layout.engine_slots for s in slots)]:
        assert s.gpu_index == (s.bundle_index if layout.use_gpus else None)
    # Training ranks: contiguous, in (node, GPU) order, starting at the first node's bundle 0.
    assert len(layout.train_slots) == config.train.num_workers
    assert order(layout.train_slots[0]) == (0, 0)
    for a, b in zip(layout.train_slots, layout.train_slots[1:], strict=False):
        assert order(b) in {(a.node_index, a.bundle_index + 1), (a.node_index + 1, 0)}
    # Tensor-parallel groups never cross a node.
    for g in range(0, len(layout.train_slots), tensor):
        assert len({s.node_index for s in layout.train_slots[g : g + tensor]}) == 1
    # Engines: disjoint from trainers and each other, or (colocated) on the trainers' slots.
    assert len(layout.engine_slots) == config.rollout.num_engines
    engine_slots = [order(s) for slots in layout.engine_slots for s in slots]
    train_slots = [order(s) for s in layout.train_slots]
    if config.placement.colocate and layout.use_gpus:
        assert engine_slots == train_slots
    elif config.placement.colocate:
        assert engine_slots[: len(train_slots)] == train_slots[: len(engine_slots)]
    else:
        assert len(set(engine_slots)) == len(engine_slots)
        assert not set(engine_slots) & set(train_slots)
    # An engine sits inside one node, or spans whole nodes.
    for e in range(len(layout.engine_slots)):
        spans = layout.engine_spans(e)
        if len(spans) > 1:
            for span in spans:
                assert len(span.slots) == layout.bundles_per_node[span.node_index]
                assert span.base_gpu_id == 0
    # The dry-run table names every actor.
    table = layout.describe()
    assert f"train {config.train.num_workers - 1} " in table
    assert f"engine {config.rollout.num_engines - 1}" in table


def node_of(layout: Layout, slot_or_slots) -> int:
    slots = slot_or_slots if isinstance(slot_or_slots, tuple) else (slot_or_slots,)
    assert len({s.node_index for s in slots}) == 1
    return slots[0].node_index


# --- the planner, on synthetic clusters -----------------------------------------------------

ONE_NODE = synthetic_cluster(1, 8, 64)
THREE_NODES = synthetic_cluster(3, 8, 64)


def test_one_node_disaggregated():
    config = make_config(4, 2, 2, tensor=2)
    layout = plan_layout(ONE_NODE, config)
    check_invariants(layout, config)
    assert [s.gpu_index for s in layout.train_slots] == [0, 1, 2, 3]
    assert [[s.gpu_index for s in e] for e in layout.engine_slots] == [[4, 5], [6, 7]]
    assert layout.bundles_per_node == (8,)
    assert layout.bundle_resources == {"GPU": 1.0, "CPU": 1.0}


def test_one_node_colocated():
    config = make_config(8, 4, 2, tensor=2, colocate=True)
    layout = plan_layout(ONE_NODE, config)
    check_invariants(layout, config)
    assert layout.bundles_per_node == (8,)
    assert [[s.gpu_index for s in e] for e in layout.engine_slots] == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
    ]


def test_three_nodes_disaggregated():
    config = make_config(16, 2, 4, tensor=8)
    layout = plan_layout(THREE_NODES, config)
    check_invariants(layout, config)
    assert [node_of(layout, s) for s in layout.train_slots] == [0] * 8 + [1] * 8
    assert [node_of(layout, e) for e in layout.engine_slots] == [2, 2]
    assert layout.bundles_per_node == (8, 8, 8)


def test_three_nodes_colocated():
    config = make_config(24, 3, 8, tensor=4, colocate=True)
    layout = plan_layout(THREE_NODES, config)
    check_invariants(layout, config)
    assert [node_of(layout, e) for e in layout.engine_slots] == [0, 1, 2]


def test_engine_wider_than_a_node_spans_whole_nodes():
    config = make_config(4, 1, 16)
    layout = plan_layout(THREE_NODES, config)
    check_invariants(layout, config)
    spans = layout.engine_spans(0)
    # The trainers' node has 4 GPUs left: the engine skips them and takes nodes 1 and 2.
    assert [(s.node_index, len(s.slots), s.base_gpu_id) for s in spans] == [(1, 8, 0), (2, 8, 0)]
    assert layout.bundles_per_node == (4, 8, 8)


def test_small_engine_skips_a_node_with_too_few_gpus_left():
    config = make_config(6, 2, 4)
    layout = plan_layout(THREE_NODES, config)
    check_invariants(layout, config)
    assert [node_of(layout, e) for e in layout.engine_slots] == [1, 1]
    assert layout.bundles_per_node == (6, 8)


@pytest.mark.parametrize("colocate", [False, True])
def test_zero_gpus_places_cpu_bundles_by_cpu_capacity(colocate):
    cluster = synthetic_cluster(2, 0, 2)
    config = make_config(2, 2, 4, colocate=colocate, cpus_per_bundle=0.5)
    layout = plan_layout(cluster, config)
    check_invariants(layout, config)
    assert not layout.use_gpus
    assert layout.bundle_resources == {"CPU": 0.5}
    # 2 CPUs / 0.5 = 4 bundles per node: everything fits on the first node.
    assert layout.bundles_per_node == ((2,) if colocate else (4,))
    assert all(len(e) == 1 for e in layout.engine_slots)  # gpus_per_engine ignored on CPU


def test_cpu_bundles_spill_to_the_next_node():
    config = make_config(4, 3, cpus_per_bundle=1.0)
    layout = plan_layout(synthetic_cluster(3, 0, 3), config)
    check_invariants(layout, config)
    # 3 bundles per node: trainers 0-2 fill node 0, rank 3 and engines 0-1 node 1, engine 2.
    assert layout.bundles_per_node == (3, 3, 1)
    assert [node_of(layout, e) for e in layout.engine_slots] == [1, 1, 2]


def test_colocated_cpu_extra_engines_get_their_own_bundles():
    config = make_config(1, 3, colocate=True, cpus_per_bundle=1.0)
    layout = plan_layout(synthetic_cluster(1, 0, 4), config)
    check_invariants(layout, config)
    assert layout.engine_slots[0] == (layout.train_slots[0],)
    assert layout.bundles_per_node == (3,)


def test_use_gpus_no_ignores_the_gpus():
    config = make_config(2, 1, use_gpus="no")
    layout = plan_layout(ONE_NODE, config)
    check_invariants(layout, config)
    assert layout.bundle_resources == {"CPU": 1.0}


def test_plans_are_deterministic_whatever_the_node_order():
    nodes = THREE_NODES.nodes
    shuffled = ClusterShape((nodes[2], nodes[0], nodes[1]))
    config = make_config(16, 1, 8, tensor=8)
    assert plan_layout(shuffled, config) == plan_layout(THREE_NODES, config)
    assert shuffled.nodes == THREE_NODES.nodes


def test_nodes_without_gpus_are_skipped():
    head = NodeShape("0" * 56, "10.0.0.0", 0, 8)  # a CPU-only head sorts first
    cluster = ClusterShape((head, *ONE_NODE.nodes))
    layout = plan_layout(cluster, make_config(4, 4))
    assert layout.nodes == ONE_NODE.nodes


@pytest.mark.parametrize(
    ("cluster", "config", "fragments"),
    [
        pytest.param(
            THREE_NODES,
            make_config(12, 1, tensor=3),
            ["train.parallel.tensor=3 does not divide the 8 GPUs of node 10.0.0.1", "ranks 6-8"],
            id="tp-straddles",
        ),
        pytest.param(
            ONE_NODE,
            make_config(16, 2, 8),
            [
                "needs 32 GPUs",
                "train.num_workers=16",
                "rollout.num_engines=2",
                "rollout.gpus_per_engine=8",
                "has 8 (8 on 10.0.0.1",
            ],
            id="too-many-gpus",
        ),
        pytest.param(
            THREE_NODES,
            make_config(8, 3, 2, colocate=True),
            ["rollout.num_engines x rollout.gpus_per_engine (3 x 2 = 6)", "train.num_workers=8"],
            id="colocate-mismatch",
        ),
        pytest.param(
            THREE_NODES,
            make_config(24, 8, 3, colocate=True),
            ["engine 2 (rollout.gpus_per_engine=3)", "ranks 6-8", "straddle"],
            id="colocated-engine-straddles",
        ),
        pytest.param(
            THREE_NODES,
            make_config(4, 1, 12),
            ["rollout.gpus_per_engine=12", "whole nodes", "8 + 8"],
            id="wide-engine-not-whole-nodes",
        ),
        pytest.param(
            synthetic_cluster(2, 8, 64),
            make_config(6, 3, 3),
            ["engine 2 needs rollout.gpus_per_engine=3", "2 on 10.0.0.1", "2 on 10.0.0.2"],
            id="engine-fits-no-node",
        ),
        pytest.param(
            synthetic_cluster(2, 0, 2),
            make_config(2, 2, use_gpus="yes"),
            ["placement.use_gpus=yes", "no GPU"],
            id="yes-without-gpus",
        ),
        pytest.param(
            synthetic_cluster(2, 0, 2),
            make_config(4, 2, cpus_per_bundle=1.0),
            ["needs 6 CPU bundles", "placement.cpus_per_bundle=1.0", "has 4"],
            id="too-few-cpus",
        ),
        pytest.param(
            synthetic_cluster(1, 8, 16),
            make_config(8, 8, colocate=True, cpus_per_bundle=4),
            ["8 GPU bundles x placement.cpus_per_bundle=4", "32 CPUs", "has 16"],
            id="gpu-bundles-need-too-many-cpus",
        ),
        pytest.param(
            ClusterShape(()),
            make_config(1, 1),
            ["no alive node"],
            id="empty-cluster",
        ),
    ],
)
def test_impossible_plans_name_the_numbers(cluster, config, fragments):
    with pytest.raises(UserError) as error:
        plan_layout(cluster, config)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_bundle_order_follows_the_gpus_ray_assigned():
    # Ray bundle j holds GPU held[j]: planned bundle i must use the Ray bundle holding GPU i.
    held = [3, 0, 2, 1]
    order = bundle_order_by_gpu(held)
    assert [held[j] for j in order] == [0, 1, 2, 3]
    # GPUs 0-1 taken by another job: planned GPUs map onto the remaining ones in order.
    assert [[5, 2, 4, 3][j] for j in bundle_order_by_gpu([5, 2, 4, 3])] == [2, 3, 4, 5]


# --- real placement groups ------------------------------------------------------------------


@ray.remote
class Reporter:
    """Stands in for a trainer or engine: says where Ray put it."""

    def where(self) -> tuple[str, list[int]]:
        return ray.get_runtime_context().get_node_id(), [int(g) for g in ray.get_gpu_ids()]


@ray.remote(num_cpus=0, max_calls=0)
def where() -> tuple[str, list[int]]:
    return ray.get_runtime_context().get_node_id(), [int(g) for g in ray.get_gpu_ids()]


def _no_uv_runtime_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `uv run`, Ray 2.60 makes every worker `uv run` a fresh copy of the project's
    environment (tens of seconds per job); tests use this venv's python directly."""
    import ray._private.ray_constants as ray_constants

    monkeypatch.setattr(ray_constants, "RAY_ENABLE_UV_RUN_RUNTIME_ENV", False)


def check_landing(placement: Placement, role: Role, index: int, *, actor: bool, **kw) -> None:
    """Start an actor (or a task, cheaper) with `actor_options`; it must report the planned
    node and the planned GPU."""
    options = placement.actor_options(role, index, **kw)
    if actor:
        handle = Reporter.options(**options).remote()
        node_id, gpus = ray.get(handle.where.remote(), timeout=60)
        ray.kill(handle)
    else:
        node_id, gpus = ray.get(where.options(**options).remote(), timeout=60)
    slot = placement.slot(role, index, kw.get("node_rank", 0))
    assert node_id == placement.layout.nodes[slot.node_index].node_id
    expected = [] if slot.gpu_index is None else [slot.gpu_index]
    assert gpus == expected
    assert placement.gpu_id(slot) == slot.gpu_index


def live_groups() -> int:
    return sum(g["state"] != "REMOVED" for g in placement_group_table().values())


@pytest.fixture(scope="class")
def local_ray():
    """One node with 8 fake GPUs and 4 logical CPUs (bundles take 0.1 CPU each)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _no_uv_runtime_env(monkeypatch)
        ray.init(
            address="local", num_gpus=8, num_cpus=4, include_dashboard=False, log_to_driver=False
        )
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="class")
def three_nodes():
    """`ray.cluster_utils.Cluster`: three raylets of 8 fake GPUs each on this machine."""
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as monkeypatch:
        _no_uv_runtime_env(monkeypatch)
        node_args = {"num_gpus": 8, "num_cpus": 4}
        cluster = Cluster(
            initialize_head=True, head_node_args={**node_args, "include_dashboard": False}
        )
        try:
            for _ in range(2):
                cluster.add_node(wait=False, **node_args)  # both start at once
            cluster.wait_for_nodes(timeout=120)  # generous: CI machines are small and busy
            ray.init(address=cluster.address, log_to_driver=False)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.mark.cluster
@pytest.mark.usefixtures("local_ray")
class TestLocalFakeGpus:
    """Real placement groups and actors on `ray.init(num_gpus=8)`."""

    def test_disaggregated_actors_land_on_planned_gpus(self):
        config = make_config(4, 2, 2, tensor=2, cpus_per_bundle=0.1)
        layout = plan_layout(read_cluster_shape(), config)
        placement = create_placement(layout, timeout_s=60)
        try:
            assert [len(g.bundle_specs) for g in placement.groups] == [8]
            for rank in range(4):
                check_landing(placement, Role.TRAIN, rank, actor=rank == 0)
            for engine in range(2):  # engine actors: see the colocated test
                check_landing(placement, Role.ENGINE, engine, actor=False)
            assert placement.actor_options(Role.TRAIN, 0)["num_gpus"] == 1
        finally:
            placement.remove()
        assert live_groups() == 0

    def test_colocated_trainer_and_engine_share_one_gpu(self):
        config = make_config(2, 2, colocate=True, cpus_per_bundle=0.1)
        placement = create_placement(plan_layout(read_cluster_shape(), config), timeout_s=60)
        try:
            options = placement.actor_options(Role.ENGINE, 1)
            assert options["num_gpus"] == 0.5
            trainer = Reporter.options(**placement.actor_options(Role.TRAIN, 1)).remote()
            engine = Reporter.options(**options).remote()
            (_, trainer_gpus), (_, engine_gpus) = ray.get(
                [trainer.where.remote(), engine.where.remote()], timeout=60
            )
            assert trainer_gpus == engine_gpus == [1]
        finally:
            placement.remove()

    def test_cpu_only_bundles_on_a_gpu_cluster(self):
        config = make_config(2, 1, use_gpus="no", cpus_per_bundle=0.1)
        placement = create_placement(plan_layout(read_cluster_shape(), config), timeout_s=60)
        try:
            assert placement.layout.bundle_resources == {"CPU": 0.1}
            check_landing(placement, Role.ENGINE, 0, actor=False)
            assert placement.actor_options(Role.TRAIN, 1)["num_gpus"] == 0
        finally:
            placement.remove()

    def test_groups_that_never_get_ready_time_out_and_are_removed(self):
        (node,) = read_cluster_shape().nodes
        bigger = ClusterShape((NodeShape(node.node_id, node.address, 16, node.num_cpus),))
        layout = plan_layout(bigger, make_config(12, 1, cpus_per_bundle=0.1))
        with pytest.raises(PlacementNotReady) as error:
            create_placement(layout, timeout_s=2)
        assert "13 bundles of {GPU: 1, CPU: 0.1}" in str(error.value)
        assert node.label in str(error.value)
        assert live_groups() == 0

    def test_synthetic_layout_is_refused(self):
        layout = plan_layout(ONE_NODE, make_config(1, 1))
        with pytest.raises(UserError, match="not an alive node"):
            create_placement(layout)


@pytest.mark.cluster
@pytest.mark.usefixtures("three_nodes")
class TestThreeNodes:
    """Real placement groups and actors on three nodes of 8 fake GPUs."""

    def test_actors_land_on_planned_nodes_and_gpus(self):
        shape = read_cluster_shape()
        assert [n.num_gpus for n in shape.nodes] == [8, 8, 8]
        config = make_config(16, 2, 4, tensor=8, cpus_per_bundle=0.1)
        layout = plan_layout(shape, config)
        check_invariants(layout, config)
        placement = create_placement(layout, timeout_s=60)
        try:
            # Every slot through a task with the actors' own options; real actors on each node.
            for rank in range(16):
                check_landing(placement, Role.TRAIN, rank, actor=rank in (0, 15))
            for engine in range(2):
                check_landing(placement, Role.ENGINE, engine, actor=engine == 1)
        finally:
            placement.remove()

    def test_wide_engine_server_per_node(self):
        config = make_config(8, 1, 16, colocate=False, cpus_per_bundle=0.1)
        placement = create_placement(plan_layout(read_cluster_shape(), config), timeout_s=60)
        try:
            assert [s.node_index for s in placement.layout.engine_spans(0)] == [1, 2]
            check_landing(placement, Role.ENGINE, 0, actor=True, node_rank=1)
            check_landing(placement, Role.ENGINE, 0, actor=False)
        finally:
            placement.remove()

    def test_group_is_pinned_to_its_planned_node(self):
        # Plan on one worker node alone: without the node-id label selector, Ray would be free
        # to put this STRICT_PACK group on any of the three nodes (the head is its usual pick).
        head = ray.get_runtime_context().get_node_id()
        last = [n for n in read_cluster_shape().nodes if n.node_id != head][-1]
        layout = plan_layout(ClusterShape((last,)), make_config(2, 1, cpus_per_bundle=0.1))
        placement = create_placement(layout, timeout_s=60)
        try:
            check_landing(placement, Role.TRAIN, 1, actor=False)
            assert placement_group_table(placement.groups[0])["bundles_to_node_id"] == {
                b: last.node_id for b in range(3)
            }
        finally:
            placement.remove()

    def test_plan_that_cannot_fit_fails_before_anything_starts(self):
        before = live_groups()
        config = make_config(16, 2, 8, cpus_per_bundle=0.1)
        with pytest.raises(UserError) as error:
            plan_layout(read_cluster_shape(), config)  # the step before create_placement
        assert "needs 32 GPUs" in str(error.value)
        assert "has 24 (8 on" in str(error.value)
        assert live_groups() == before
