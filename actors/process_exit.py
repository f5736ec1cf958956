"""Waiting until killed actors' processes have exited, on whichever nodes they ran.

`ray.kill` is asynchronous: Ray marks the actor dead at once (its calls fail, its bundle can
take a new actor) and the process exits a moment later, or, if it does not exit by itself,
when the raylet kills it a few seconds later. A GPU's memory is freed only when the process
holding it is gone, so a replacement placed in the same bundle must wait for that.

Each node's processes are watched by a small task on that node. This module imports only
what the watch needs: the task's worker process loads it, not the actors' torch stack.
"""

import time

import psutil
import ray
from ray.exceptions import GetTimeoutError, TaskUnschedulableError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from ray.util.state import get_actor
from ray.util.state.exception import RayStateApiException

POLL_S = 0.05
"""How often a watch looks at its processes again."""
WATCH_START_S = 60.0
"""What a watch may take beyond its own bound: a worker process to start on its node."""


def actor_processes(actors: list[ray.actor.ActorHandle]) -> dict[int, tuple[str, int]] | None:
    """{index: (node id, pid)} of the `actors` that have a process, from Ray's state API;
    None if the API cannot tell (it is served by the dashboard, which may be off)."""
    address = ray.get_runtime_context().gcs_address
    processes = {}
    for i, actor in enumerate(actors):
        try:
            state = get_actor(actor._actor_id.hex(), address=address)
        except (RayStateApiException, OSError, ValueError):  # no dashboard, or not reached
            return None
        if state is None:
            return None
        if state.pid and state.node_id:  # an actor still waiting for its bundle has none
            processes[i] = (state.node_id, state.pid)
    return processes


def wait_for_exit(processes: dict[int, tuple[str, int]], timeout_s: float) -> list[int]:
    """Wait until every process of `processes` ({index: (node id, pid)}) has exited, at most
    `timeout_s` (plus a watch's start-up); return the indices of those still running."""
    by_node: dict[str, dict[int, int]] = {}
    for i, (node, pid) in processes.items():
        by_node.setdefault(node, {})[i] = pid
    watches = {
        node: _watch.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
        ).remote(pids, timeout_s)
        for node, pids in by_node.items()
    }
    running = []
    for node, watch in watches.items():
        try:
            running += ray.get(watch, timeout=timeout_s + WATCH_START_S)
        except TaskUnschedulableError:  # the node is gone, and its processes with it
            continue
        except GetTimeoutError:  # no worker could start there: nothing is known
            running += by_node[node]
    return sorted(running)


@ray.remote(num_cpus=0, max_retries=0)
def _watch(pids: dict[int, int], timeout_s: float) -> list[int]:
    """On the processes' node: the indices (of {index: pid}) still running after `timeout_s`."""
    end = time.monotonic() + timeout_s
    while True:
        running = [i for i, pid in pids.items() if _running(pid)]
        if not running or time.monotonic() >= end:
            return running
        time.sleep(POLL_S)


def _running(pid: int) -> bool:
    """A zombie has exited (its memory is freed); only its parent has not collected it yet."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
