"""Cluster shape + config -> where every actor goes. Pure: no Ray, no I/O.

The planner decides everything that can be decided before a single Ray call: which node and
which local GPU each training rank and each engine gets, how many placement-group bundles each
node needs, and whether the run fits at all. Doing it up front means an impossible config is
a `UserError` naming the numbers, raised before any actor starts, and `driver.py --dry-run`
can print the whole layout from a synthetic cluster.

Ordering rules (they make a plan deterministic and easy to read):
- nodes are taken in `ClusterShape` order (sorted by address, then node id);
- on a node, GPUs are used from 0 upward, and bundle i of a node's placement group is the
  node's i-th used GPU, so bundles are ordered by (node, GPU);
- training ranks come first and are contiguous; a tensor-parallel group never crosses a node;
- engines follow the trainers (disaggregated) or reuse the trainers' GPUs (colocated).

CPU mode (no GPU in the cluster, or `placement.use_gpus=no`): every actor gets one bundle of
`placement.cpus_per_bundle` CPUs, packed onto nodes by CPU capacity. In colocated CPU mode
engine e shares the bundle of training rank e, mirroring the GPU layout (so the colocated code
paths also run on a laptop) and halving the CPUs reserved; engines beyond the number of
trainers get bundles of their own. `rollout.gpus_per_engine` is ignored in CPU mode: one
engine is one bundle.
"""

import math
from dataclasses import dataclass

from config.errors import UserError
from config.schema import SluiceConfig


@dataclass(frozen=True)
class NodeShape:
    """One alive Ray node as the planner sees it."""

    node_id: str
    """Ray node id (hex); placement groups are pinned to it."""
    address: str
    """Node IP address, for people reading the plan."""
    num_gpus: int
    num_cpus: float

    @property
    def label(self) -> str:
        """Address plus a short id: fake multi-node clusters share one address."""
        return f"{self.address} [{self.node_id[:8]}]"


@dataclass(frozen=True)
class ClusterShape:
    """The nodes a plan may use, always sorted by (address, node_id) so plans are repeatable."""

    nodes: tuple[NodeShape, ...]

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.nodes, key=lambda n: (n.address, n.node_id)))
        object.__setattr__(self, "nodes", ordered)

    @property
    def num_gpus(self) -> int:
        return sum(n.num_gpus for n in self.nodes)


@dataclass(frozen=True)
class Slot:
    """One GPU (or one CPU-only bundle) of the plan.

    `node_index` indexes `Layout.nodes`; `bundle_index` is the bundle of that node's placement
    group as planned (groups.py maps it to the Ray bundle that really holds `gpu_index`).
    """

    node_index: int
    gpu_index: int | None
    bundle_index: int


@dataclass(frozen=True)
class EngineSpan:
    """The part of one engine that lives on one node (SGLang runs one server per node)."""

    node_index: int
    slots: tuple[Slot, ...]

    @property
    def base_gpu_id(self) -> int | None:
        """First local GPU of this part."""
        return self.slots[0].gpu_index


@dataclass(frozen=True)
class Layout:
    """The whole plan: nodes used, bundles per node, and each actor's slots."""

    use_gpus: bool
    colocate: bool
    cpus_per_bundle: float
    nodes: tuple[NodeShape, ...]
    """Nodes that hold at least one bundle, in cluster order."""
    bundles_per_node: tuple[int, ...]
    """Bundle count of each node's placement group (parallel to `nodes`)."""
    train_slots: tuple[Slot, ...]
    """Index = training rank."""
    engine_slots: tuple[tuple[Slot, ...], ...]
    """Index = engine; each engine's slots in (node, GPU) order."""

    @property
    def bundle_resources(self) -> dict[str, float]:
        """Resources of every bundle (all bundles of a plan are alike)."""
        if self.use_gpus:
            return {"GPU": 1.0, "CPU": self.cpus_per_bundle}
        return {"CPU": self.cpus_per_bundle}

    @property
    def num_bundles(self) -> int:
        return sum(self.bundles_per_node)

    def engine_spans(self, engine: int) -> tuple[EngineSpan, ...]:
        """The distinct nodes engine `engine` spans, in order (node_rank = position)."""
        spans: list[EngineSpan] = []
        for slot in self.engine_slots[engine]:
            if spans and spans[-1].node_index == slot.node_index:
                last = spans.pop()
                spans.append(EngineSpan(last.node_index, (*last.slots, slot)))
            else:
                spans.append(EngineSpan(slot.node_index, (slot,)))
        return tuple(spans)

    def describe(self) -> str:
        """A table for `driver.py --dry-run`: every actor -> node, bundle, GPU."""
        return _describe(self)


def plan_layout(cluster: ClusterShape, config: SluiceConfig) -> Layout:
    """Place every training rank and engine of `config` on `cluster`, or raise `UserError`."""
    if not cluster.nodes:
        raise UserError("the Ray cluster has no alive node to place actors on")
    use_gpus = _decide_use_gpus(cluster, config)
    if use_gpus:
        return _plan_gpus(cluster, config)
    return _plan_cpus(cluster, config)


def _decide_use_gpus(cluster: ClusterShape, config: SluiceConfig) -> bool:
    mode = config.placement.use_gpus
    if mode == "yes" and cluster.num_gpus == 0:
        raise UserError(
            f"placement.use_gpus=yes but the cluster's {len(cluster.nodes)} node(s) have no GPU; "
            "start Ray on GPU nodes or set placement.use_gpus=auto (a dry run plans for a GPU "
            "cluster from any machine with --cluster NODESxGPUS, e.g. 1x8)"
        )
    return mode != "no" and cluster.num_gpus > 0


# --- GPU mode -------------------------------------------------------------------------------


class _Cursor:
    """Hands out units (GPUs, or CPU bundles) node by node, never going back to a node.

    Units on a node are taken from 0 upward, so the units used on a node are always 0..k-1 and
    the unit index doubles as the bundle index.
    """

    def __init__(self, nodes: tuple[NodeShape, ...], capacity: list[int], unit: str) -> None:
        self.nodes = nodes
        self.capacity = capacity
        self.used = [0] * len(capacity)
        self.node = 0
        self.unit = unit

    def free(self, node: int) -> int:
        return self.capacity[node] - self.used[node] if node >= self.node else 0

    def take(self, node: int, count: int) -> list[tuple[int, int]]:
        """`count` units of `node`; moves the cursor there (earlier nodes are closed)."""
        start = self.used[node]
        self.used[node] += count
        self.node = node
        return [(node, start + i) for i in range(count)]

    def free_listing(self) -> str:
        """Unused units per node (including ones left behind the cursor), for error messages."""
        return ", ".join(
            f"{c - u} on {n.label}"
            for c, u, n in zip(self.capacity, self.used, self.nodes, strict=True)
        )


def _plan_gpus(cluster: ClusterShape, config: SluiceConfig) -> Layout:
    train, rollout = config.train, config.rollout
    colocate = config.placement.colocate
    if colocate and rollout.num_engines * rollout.gpus_per_engine != train.num_workers:
        raise UserError(
            f"placement.colocate=true puts engines on the trainers' GPUs, so rollout.num_engines "
            f"x rollout.gpus_per_engine ({rollout.num_engines} x {rollout.gpus_per_engine} = "
            f"{rollout.num_engines * rollout.gpus_per_engine}) must equal train.num_workers="
            f"{train.num_workers}; change one of them or set placement.colocate=false"
        )
    engine_gpus = 0 if colocate else rollout.num_engines * rollout.gpus_per_engine
    _check_total(
        cluster,
        train.num_workers + engine_gpus,
        _gpu_demand(config),
        "GPUs",
        [n.num_gpus for n in cluster.nodes],
    )
    cursor = _Cursor(cluster.nodes, [n.num_gpus for n in cluster.nodes], "GPUs")
    train_units = _place_trainers(cursor, train.num_workers, train.parallel.tensor)
    if colocate:
        engine_units = _split_colocated(cursor, train_units, rollout.gpus_per_engine)
    else:
        engine_units = [
            _place_engine(cursor, e, rollout.gpus_per_engine) for e in range(rollout.num_engines)
        ]
    return _build_layout(cluster, config, True, cursor.used, train_units, engine_units)


def _gpu_demand(config: SluiceConfig) -> str:
    t, r = config.train, config.rollout
    if config.placement.colocate:
        return f"train.num_workers={t.num_workers}, shared with the engines (placement.colocate)"
    return (
        f"train.num_workers={t.num_workers} + rollout.num_engines={r.num_engines} x "
        f"rollout.gpus_per_engine={r.gpus_per_engine}"
    )


def _check_total(
    cluster: ClusterShape, needed: int, demand: str, unit: str, per_node: list[int]
) -> None:
    available = sum(per_node)
    if needed > available:
        listing = ", ".join(
            f"{c} on {n.label}" for c, n in zip(per_node, cluster.nodes, strict=True)
        )
        raise UserError(
            f"the plan needs {needed} {unit} ({demand}) but the cluster has {available} ({listing})"
        )


def _place_trainers(cursor: _Cursor, num_workers: int, tensor: int) -> list[tuple[int, int]]:
    """Contiguous ranks, node after node; a TP group of `tensor` ranks stays on one node."""
    units: list[tuple[int, int]] = []
    node = _next_node_with_room(cursor, cursor.node, 1)
    for group in range(num_workers // tensor):
        if cursor.free(node) == 0:
            node = _next_node_with_room(cursor, node + 1, 1)
        if cursor.free(node) < tensor:
            first = group * tensor
            raise UserError(
                f"train.parallel.tensor={tensor} does not divide the {cursor.capacity[node]} "
                f"{cursor.unit} of node {cursor.nodes[node].label}: tensor-parallel group "
                f"{group} (ranks {first}-{first + tensor - 1}) would straddle two nodes; "
                f"make train.parallel.tensor divide the {cursor.unit} per node"
            )
        units += cursor.take(node, tensor)
    return units


def _next_node_with_room(cursor: _Cursor, start: int, count: int) -> int:
    for node in range(start, len(cursor.capacity)):
        if cursor.free(node) >= count:
            return node
    raise UserError(
        f"not enough {cursor.unit}: {count} more needed in one node, free per node: "
        f"{cursor.free_listing()}"
    )


def _place_engine(cursor: _Cursor, engine: int, gpus: int) -> list[tuple[int, int]]:
    """Disjoint GPUs after the trainers: inside one node if it fits one, else whole nodes."""
    if gpus <= max(cursor.capacity):
        for node in range(cursor.node, len(cursor.capacity)):
            if cursor.free(node) >= gpus:
                return cursor.take(node, gpus)
        raise UserError(
            f"engine {engine} needs rollout.gpus_per_engine={gpus} GPUs on one node (after the "
            f"trainers and earlier engines, in node order), but the GPUs left per node are: "
            f"{cursor.free_listing()}; lower rollout.num_engines or add nodes"
        )
    return _place_wide_engine(cursor, engine, gpus)


def _place_wide_engine(cursor: _Cursor, engine: int, gpus: int) -> list[tuple[int, int]]:
    """An engine larger than a node takes consecutive whole, untouched nodes."""
    units: list[tuple[int, int]] = []
    nodes: list[int] = []
    for node in range(cursor.node, len(cursor.capacity)):
        if len(units) == gpus:
            break
        whole = cursor.capacity[node]
        # Only the cursor's own node can be partly used (the cursor never goes back); skip it.
        if whole == 0 or cursor.used[node]:
            continue
        if len(units) + whole > gpus:
            sizes = " + ".join(str(cursor.capacity[n]) for n in [*nodes, node])
            raise UserError(
                f"rollout.gpus_per_engine={gpus} is more than one node's GPUs, so an engine "
                f"must span whole nodes, but the next whole nodes give {sizes} = "
                f"{len(units) + whole} GPUs, not {gpus}; make "
                f"rollout.gpus_per_engine a sum of whole nodes (e.g. a multiple of {whole})"
            )
        units += cursor.take(node, whole)
        nodes.append(node)
    if len(units) < gpus:
        raise UserError(
            f"engine {engine} needs rollout.gpus_per_engine={gpus} GPUs on whole unused nodes, "
            f"but only {len(units)} are left that way (GPUs free per node: "
            f"{cursor.free_listing()}); lower rollout.num_engines or add nodes"
        )
    return units


def _split_colocated(
    cursor: _Cursor, train_units: list[tuple[int, int]], gpus: int
) -> list[list[tuple[int, int]]]:
    """Engine e takes training ranks e*gpus .. (e+1)*gpus-1; check the node rule on each."""
    engines = [train_units[i : i + gpus] for i in range(0, len(train_units), gpus)]
    for e, units in enumerate(engines):
        nodes = sorted({node for node, _ in units})
        whole = all(
            sum(1 for n, _ in units if n == node) == cursor.capacity[node] for node in nodes
        )
        if len(nodes) > 1 and not whole:
            labels = " and ".join(cursor.nodes[n].label for n in nodes)
            raise UserError(
                f"placement.colocate=true: engine {e} (rollout.gpus_per_engine={gpus}) would "
                f"share training ranks {e * gpus}-{(e + 1) * gpus - 1}, which straddle nodes "
                f"{labels}; an engine must sit inside one node or span whole nodes, so make "
                f"rollout.gpus_per_engine divide the {cursor.capacity[nodes[0]]} GPUs per node"
            )
    return engines


# --- CPU mode -------------------------------------------------------------------------------


def _plan_cpus(cluster: ClusterShape, config: SluiceConfig) -> Layout:
    train, rollout = config.train, config.rollout
    per_bundle = config.placement.cpus_per_bundle
    # A tiny epsilon keeps 0.3 x 10 = 3.0 CPUs from flooring to 9 bundles.
    capacity = [math.floor(n.num_cpus / per_bundle + 1e-9) for n in cluster.nodes]
    shared = min(train.num_workers, rollout.num_engines) if config.placement.colocate else 0
    needed = train.num_workers + rollout.num_engines - shared
    demand = (
        f"one bundle of placement.cpus_per_bundle={per_bundle} CPUs for each of "
        f"train.num_workers={train.num_workers} and rollout.num_engines={rollout.num_engines}"
        + (", engines sharing the trainers' bundles (placement.colocate)" if shared else "")
    )
    _check_total(cluster, needed, demand, "CPU bundles", capacity)
    cursor = _Cursor(cluster.nodes, capacity, "CPU bundles")
    train_units = _place_trainers(cursor, train.num_workers, train.parallel.tensor)
    engine_units = [[unit] for unit in train_units[:shared]]
    for _ in range(rollout.num_engines - shared):
        engine_units.append(cursor.take(_next_node_with_room(cursor, cursor.node, 1), 1))
    return _build_layout(cluster, config, False, cursor.used, train_units, engine_units)


# --- assembling the layout ------------------------------------------------------------------


def _build_layout(
    cluster: ClusterShape,
    config: SluiceConfig,
    use_gpus: bool,
    used: list[int],
    train_units: list[tuple[int, int]],
    engine_units: list[list[tuple[int, int]]],
) -> Layout:
    """Drop unused nodes, renumber the rest, and turn (node, unit) pairs into Slots."""
    kept = [i for i, count in enumerate(used) if count]
    renumber = {old: new for new, old in enumerate(kept)}
    nodes = tuple(cluster.nodes[i] for i in kept)
    _check_cpus(nodes, [used[i] for i in kept], config.placement.cpus_per_bundle, use_gpus)

    def slot(unit: tuple[int, int]) -> Slot:
        node, index = unit
        return Slot(renumber[node], index if use_gpus else None, index)

    return Layout(
        use_gpus=use_gpus,
        colocate=config.placement.colocate,
        cpus_per_bundle=config.placement.cpus_per_bundle,
        nodes=nodes,
        bundles_per_node=tuple(used[i] for i in kept),
        train_slots=tuple(slot(u) for u in train_units),
        engine_slots=tuple(tuple(slot(u) for u in units) for units in engine_units),
    )


def _check_cpus(
    nodes: tuple[NodeShape, ...], bundles: list[int], per_bundle: float, use_gpus: bool
) -> None:
    """GPU bundles also reserve CPUs; a node must hold them all (CPU mode packed by CPUs)."""
    if not use_gpus:
        return
    for node, count in zip(nodes, bundles, strict=True):
        if count * per_bundle > node.num_cpus + 1e-9:
            raise UserError(
                f"node {node.label} gets {count} GPU bundles x placement.cpus_per_bundle="
                f"{per_bundle} = {count * per_bundle:g} CPUs but has {node.num_cpus:g}; lower "
                f"placement.cpus_per_bundle to at most {node.num_cpus / count:g}"
            )


def _describe(layout: Layout) -> str:
    mode = "colocated" if layout.colocate else "disaggregated"
    device = (
        f"{layout.num_bundles} GPUs" if layout.use_gpus else f"{layout.num_bundles} CPU bundles"
    )
    resources = ", ".join(f"{k}: {v:g}" for k, v in layout.bundle_resources.items())
    lines = [
        f"placement: {device} on {len(layout.nodes)} node(s), {mode}, each bundle {{{resources}}}",
        f"{'node':<5} {'address':<16} {'node id':<14} bundles",
    ]
    for i, (node, count) in enumerate(zip(layout.nodes, layout.bundles_per_node, strict=True)):
        lines.append(f"{i:<5} {node.address:<16} {node.node_id[:12]:<14} {count}")
    lines.append(f"{'actor':<12} {'node':<5} {'address':<16} {'node id':<14} {'bundle':<7} gpu")
    rows = [(f"train {r}", s) for r, s in enumerate(layout.train_slots)]
    for e, slots in enumerate(layout.engine_slots):
        rows += [
            (f"engine {e}" + (f".{k}" if len(slots) > 1 else ""), s) for k, s in enumerate(slots)
        ]
    for name, s in rows:
        node = layout.nodes[s.node_index]
        gpu = "-" if s.gpu_index is None else str(s.gpu_index)
        lines.append(
            f"{name:<12} {s.node_index:<5} {node.address:<16} {node.node_id[:12]:<14} "
            f"{s.bundle_index:<7} {gpu}"
        )
    if any(len(s) > 1 for s in layout.engine_slots):
        lines.append("engine e.k = GPU k of engine e; the engine actor sits in its first slot")
    return "\n".join(lines)
