"""The seed's rules for runs over several nodes, applied at start-up before any actor exists.

1. Paths: the model, the data and the checkpoints must be visible from every node the plan
   uses (a shared file system). A task pinned to each node checks the paths the run reads, and
   writes a marker into `checkpoint.save` on one node that every other node must see; the
   first node missing something is named with the path, and nothing starts.
2. Master addresses come from Ray: every process group's rank 0 reports its node's IP as Ray
   sees it (`weights.process_group.pick_master_address_and_port`), never `MASTER_ADDR`.
3. CPU Adam: when the trainers span several nodes, the distributed optimizer already spreads
   the optimizer state over many more GPUs, so CPU Adam (and its two companion flags) is turned
   off with a notice, unless `train.cpu_adam_on_multiple_nodes` keeps it.
"""

import contextlib
import os
import uuid
from dataclasses import dataclass

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from config.errors import UserError
from config.schema import BUILTIN_MODEL, SluiceConfig
from placement.planner import Layout

CHECK_TIMEOUT_S = 120.0
CPU_ADAM_FLAGS = (
    "optimizer_cpu_offload",
    "overlap_cpu_optimizer_d2h_h2d",
    "use_precision_aware_optimizer",
    "overlap_cpu_adam_with_forward",
)


@dataclass(frozen=True)
class RunPath:
    """One path of the run that every node must see."""

    key: str
    """The config key that names it, e.g. `model.hf_checkpoint`."""
    path: str


def read_paths(config: SluiceConfig) -> list[RunPath]:
    """Paths the actors read: model, prompt files, the checkpoint to resume from."""
    named = config.eval.prompt_data  # named eval sets replace data.eval_data: it is not read
    candidates = [
        ("model.hf_checkpoint", config.model.hf_checkpoint),
        ("data.prompt_data", config.data.prompt_data),
        ("data.eval_data", None if named else config.data.eval_data),
        *((f"eval.prompt_data.{name}", path) for name, path in named.items()),
        ("checkpoint.load", config.checkpoint.load),
    ]
    return [
        RunPath(key, path)
        for key, path in candidates
        if path and not path.startswith("builtin:") and path != BUILTIN_MODEL
    ]


def apply_cpu_adam_rule(config: SluiceConfig, layout: Layout) -> str | None:
    """Turn CPU Adam off when the trainers span several nodes (unless kept); the notice."""
    train = config.train
    nodes = {slot.node_index for slot in layout.train_slots}
    on = [flag for flag in CPU_ADAM_FLAGS if getattr(train, flag)]
    if len(nodes) < 2 or not train.optimizer_cpu_offload or train.cpu_adam_on_multiple_nodes:
        return None
    for flag in on:
        setattr(train, flag, False)
    return (
        f"the trainers span {len(nodes)} nodes: turning off CPU Adam ({', '.join(on)}), since "
        f"the distributed optimizer already shards the optimizer state over every rank (the "
        f"seed's multi-node advice); train.cpu_adam_on_multiple_nodes=true keeps it"
    )


def check_paths_on_nodes(config: SluiceConfig, layout: Layout) -> None:
    """Raise UserError naming the node and the path when a node of the plan cannot see one."""
    if not layout.nodes:
        return
    reads = [(p.key, p.path) for p in read_paths(config)]
    marker = None
    save = config.checkpoint.save
    if save:
        marker = os.path.join(save, f".sluice-visible-{uuid.uuid4().hex}")
        _on_node(layout, 0, _write_marker, save, marker)
    try:
        for index, node in enumerate(layout.nodes):
            wanted = reads + ([("checkpoint.save", marker)] if marker else [])
            missing = _on_node(layout, index, _missing, wanted)
            if missing:
                key, path = missing[0]
                shown = save if key == "checkpoint.save" else path
                raise UserError(
                    f"{key}={shown} is not visible on node {node.label} (node {index} of the "
                    f"plan){_written_on(layout, key)}: put the model, data and checkpoints on a "
                    f"file system that every node mounts at the same path"
                )
    finally:
        if marker:
            _on_node(layout, 0, _remove, marker)


def _written_on(layout: Layout, key: str) -> str:
    if key != "checkpoint.save":
        return ""
    return f"; a file written there on node {layout.nodes[0].label} did not appear"


def _on_node(layout: Layout, index: int, function, *args):
    """Run `function(*args)` in a task pinned to node `index` of the plan; its result.

    On the driver's own node it runs here: the same machine sees the same files, and a task
    would first start a worker process (seconds of every local run's start-up)."""
    if layout.nodes[index].node_id == ray.get_runtime_context().get_node_id():
        return function(*args)
    task = ray.remote(num_cpus=0)(function).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(layout.nodes[index].node_id, soft=False)
    )
    try:
        return ray.get(task.remote(*args), timeout=CHECK_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise UserError(
            f"checking paths on node {layout.nodes[index].label} took over {CHECK_TIMEOUT_S:g} s; "
            f"is the node alive?"
        ) from None


def _missing(paths: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(key, path) for key, path in paths if not os.path.exists(path)]


def _write_marker(directory: str, marker: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        with open(marker, "w") as f:
            f.write("written by Sluice to check that every node sees this directory\n")
    except OSError as e:
        raise UserError(f"checkpoint.save={directory} cannot be written: {e}") from None


def _remove(marker: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(marker)
