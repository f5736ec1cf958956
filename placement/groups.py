"""Layout -> real Ray placement groups, and the `.options()` that put each actor in its slot.

One placement group per planned node, strategy STRICT_PACK, each bundle `{"GPU": 1, "CPU":
c}` (or `{"CPU": c}` in CPU mode). Each group is pinned to its planned node with a bundle label
selector on `ray.io/node-id` (Ray 2.60 labels every node with its id), so the node a Slot
names is the node its actor runs on.

Ray does not promise that bundle i of a group holds local GPU i, so after the groups are ready
a probe task runs in every bundle, reports its node and `ray.get_gpu_ids()`, and planned
bundle i is mapped to the Ray bundle holding the node's i-th GPU.

Concurrency rules:
- `create_placement` returns only when every group is ready and every probe has finished;
  probes take a bundle's whole GPU, so they must be done before actors (which may take a
  fraction of it) are placed. Callers create actors only after it returns.
- If anything fails or times out, the groups made so far are removed before the error
  propagates: a failed start never leaves GPUs reserved.
"""

import logging
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import (
    NODE_ID_LABEL_KEY,
    PlacementGroup,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from config.errors import UserError
from placement.planner import Layout, Slot

logger = logging.getLogger(__name__)

DEFAULT_COLOCATED_FRACTION = 0.5
"""Share of a bundle (its GPU and CPUs) each actor asks for when trainers and engines share."""


class Role(StrEnum):
    TRAIN = "train"
    ENGINE = "engine"


class PlacementNotReady(UserError):
    """The cluster did not grant the planned bundles in time (busy, shrunk, or mis-sized)."""


class Placement:
    """Live placement groups of one Layout; hands out actor options per role and index.

    `bundle_order[k][b]` is the Ray bundle index of planned bundle b on planned node k;
    `gpu_ids[k][b]` is the GPU id Ray reports inside it (None in CPU mode).
    """

    def __init__(
        self,
        layout: Layout,
        groups: Sequence[PlacementGroup],
        bundle_order: Sequence[Sequence[int]],
        gpu_ids: Sequence[Sequence[int | None]],
    ) -> None:
        self.layout = layout
        self.groups = tuple(groups)
        self.bundle_order = tuple(tuple(o) for o in bundle_order)
        self.gpu_ids = tuple(tuple(g) for g in gpu_ids)

    def slot(self, role: Role, index: int, node_rank: int = 0) -> Slot:
        """The slot an actor sits in: a trainer's own slot, or the first slot of engine
        `index` on the `node_rank`-th node it spans (0 = the engine's first bundle)."""
        if Role(role) is Role.TRAIN:
            if node_rank:
                raise ValueError("a training rank has one slot; node_rank must be 0")
            return self.layout.train_slots[index]
        return self.layout.engine_spans(index)[node_rank].slots[0]

    def actor_options(
        self, role: Role, index: int, *, node_rank: int = 0, fraction: float | None = None
    ) -> dict[str, Any]:
        """Keyword arguments for `ActorClass.options(**...)` placing the actor in its slot.

        `fraction` is the share of the bundle's GPU and CPUs the actor takes: by default 1,
        or 0.5 when colocated so that a trainer and an engine fit one bundle together.
        """
        share = fraction
        if share is None:
            share = DEFAULT_COLOCATED_FRACTION if self.layout.colocate else 1.0
        slot = self.slot(role, index, node_rank)
        return {
            "num_cpus": self.layout.cpus_per_bundle * share,
            "num_gpus": share if self.layout.use_gpus else 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.groups[slot.node_index],
                placement_group_bundle_index=self.bundle_order[slot.node_index][slot.bundle_index],
            ),
        }

    def gpu_id(self, slot: Slot) -> int | None:
        """The GPU id Ray really gives actors in `slot` (equals slot.gpu_index unless another
        job held some of the node's GPUs when the groups were made)."""
        return self.gpu_ids[slot.node_index][slot.bundle_index]

    def remove(self) -> None:
        """Release every bundle. Actors still inside are killed by Ray. Safe to call twice."""
        for group in self.groups:
            remove_placement_group(group)
        self.groups = ()


def create_placement(
    layout: Layout, *, timeout_s: float = 120.0, name: str = "sluice"
) -> Placement:
    """Reserve the layout's bundles on their planned nodes, probe them, return a Placement.

    Blocks until ready (at most `timeout_s` for the groups, again for the probes); raises
    `PlacementNotReady` naming what was waited for.
    """
    _check_nodes_alive(layout)
    groups: list[PlacementGroup] = []
    try:
        for k in range(len(layout.nodes)):
            groups.append(_create_group(layout, k, f"{name}-node{k}"))
        _wait_ready(layout, groups, timeout_s)
        probes = _probe_bundles(layout, groups, timeout_s)
        order, gpus = _map_bundles(layout, probes)
    except BaseException:
        for group in groups:
            remove_placement_group(group)
        raise
    return Placement(layout, groups, order, gpus)


def _check_nodes_alive(layout: Layout) -> None:
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    for node in layout.nodes:
        if node.node_id not in alive:
            raise UserError(
                f"planned node {node.label} is not an alive node of this Ray cluster (a node "
                "left, or the plan came from a synthetic cluster); plan again from "
                "placement.cluster.read_cluster_shape()"
            )


def _create_group(layout: Layout, k: int, name: str) -> PlacementGroup:
    count = layout.bundles_per_node[k]
    pin = {NODE_ID_LABEL_KEY: layout.nodes[k].node_id}
    return placement_group(
        [dict(layout.bundle_resources) for _ in range(count)],
        strategy="STRICT_PACK",
        name=name,
        bundle_label_selector=[dict(pin) for _ in range(count)],
    )


def _wait_ready(layout: Layout, groups: list[PlacementGroup], timeout_s: float) -> None:
    refs = [group.ready() for group in groups]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if not pending:
        return
    late = [refs.index(ref) for ref in pending]
    resources = ", ".join(f"{k}: {v:g}" for k, v in layout.bundle_resources.items())
    waiting = "; ".join(
        f"node {layout.nodes[k].label}: {layout.bundles_per_node[k]} bundles of {{{resources}}}"
        for k in late
    )
    raise PlacementNotReady(
        f"placement groups not ready after {timeout_s:g} s, waiting for {waiting}; other jobs "
        "may hold those resources or the node left (see `ray status`)"
    )


@ray.remote(num_cpus=0, max_calls=0)
def _probe() -> tuple[str, list[int | str]]:
    """Runs inside one bundle: which node is this, and which GPUs did Ray hand us?"""
    return ray.get_runtime_context().get_node_id(), list(ray.get_gpu_ids())


def _probe_bundles(
    layout: Layout, groups: list[PlacementGroup], timeout_s: float
) -> list[list[tuple[str, list[int | str]]]]:
    """Probe results per node, per Ray bundle index.

    Probes go in waves (bundle b of every node at once): one worker per node then serves all
    of its node's probes in turn (max_calls=0 lets Ray reuse it), instead of starting one
    worker process per bundle.
    """
    results: list[list[tuple[str, list[int | str]]]] = [[] for _ in groups]
    num_gpus = 1 if layout.use_gpus else 0
    for b in range(max(layout.bundles_per_node)):
        nodes = [k for k, count in enumerate(layout.bundles_per_node) if b < count]
        refs = [
            _probe.options(
                num_gpus=num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(groups[k], b),
            ).remote()
            for k in nodes
        ]
        try:
            answers = ray.get(refs, timeout=timeout_s)
        except GetTimeoutError:
            raise PlacementNotReady(
                f"probe tasks in bundle {b} of the placement groups on "
                f"{', '.join(layout.nodes[k].label for k in nodes)} did not finish within "
                f"{timeout_s:g} s"
            ) from None
        for k, answer in zip(nodes, answers, strict=True):
            results[k].append(answer)
    return results


def _map_bundles(
    layout: Layout, probes: list[list[tuple[str, list[int | str]]]]
) -> tuple[list[tuple[int, ...]], list[list[int | None]]]:
    order: list[tuple[int, ...]] = []
    gpus: list[list[int | None]] = []
    for k, answers in enumerate(probes):
        node = layout.nodes[k]
        for b, (node_id, _) in enumerate(answers):
            if node_id != node.node_id:
                raise RuntimeError(
                    f"bundle {b} of the group pinned to node {node.label} landed on node "
                    f"{node_id[:8]}; the node-id label selector was not honoured"
                )
        if not layout.use_gpus:
            order.append(tuple(range(len(answers))))
            gpus.append([None] * len(answers))
            continue
        held = [_single_gpu(ids, node.label, b) for b, (_, ids) in enumerate(answers)]
        order.append(bundle_order_by_gpu(held))
        gpus.append([held[j] for j in order[-1]])
        if sorted(held) != list(range(len(held))):
            logger.warning(
                "node %s: Ray gave this run GPUs %s instead of 0-%d (another job holds some); "
                "planned GPUs are mapped onto them in order",
                node.label,
                sorted(held),
                len(held) - 1,
            )
    return order, gpus


def _single_gpu(ids: list[int | str], label: str, bundle: int) -> int:
    if len(ids) != 1 or not str(ids[0]).isdigit():
        raise RuntimeError(
            f"bundle {bundle} on node {label} reports GPUs {ids}, expected one integer id "
            "(is CUDA_VISIBLE_DEVICES on that node set to UUIDs?)"
        )
    return int(ids[0])


def bundle_order_by_gpu(held: Sequence[int]) -> tuple[int, ...]:
    """Planned bundle i -> the Ray bundle holding the node's i-th smallest GPU id.

    Planned bundle i is meant for local GPU i; when the group holds GPUs 0..n-1 this is an
    exact match whatever order Ray assigned them in. `held[j]` is the GPU of Ray bundle j.
    """
    return tuple(sorted(range(len(held)), key=lambda j: held[j]))
