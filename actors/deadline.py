"""Deadlines on the loop's actor calls: a hang becomes one message, stack dumps and an exit.

The driver runs each phase of a step (rollout, train, sync, save) inside `phase(...)`; every
wait on actors in that phase goes through `deadline.get(refs)` instead of `ray.get`, and may
take at most what is left of the phase's bound (`timeouts.<phase>_s`, for the whole phase).
When the bound passes, `PhaseTimeout` names the phase, the step and the actors whose calls it still
waits for (Ray's state API), after py-spy has written each one's stack to
`<output_dir>/stuck/step<k>-<phase>/<actor>.txt` (actors on other nodes are named with their
node and pid, for the dashboard's stack view). Outside a phase `get` is `ray.get`. Callers
that can route around a stuck actor catch it: `RolloutGroup` kills a wedged engine and gives
its work to another, with the phase's whole bound again (`renew`).

A failed task raises as soon as it fails, not at the deadline: the refs are awaited one by one.
"""

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray

PY_SPY_TIMEOUT_S = 30.0


class PhaseTimeout(RuntimeError):
    """A phase of the loop did not finish within its bound."""

    def __init__(self, message: str, stuck_actor_ids: frozenset[str] = frozenset()):
        super().__init__(message)
        self.stuck_actor_ids = stuck_actor_ids
        """Ray actor ids (hex) of the actors whose calls never finished: the driver kills
        them at once, since a call that hangs keeps them from reaching their shutdown."""


@dataclass(frozen=True)
class _Phase:
    name: str
    step: int
    timeout_s: float
    deadline: float
    """`time.monotonic()` by which the phase must be done."""
    dump_root: Path


_current: ContextVar[_Phase | None] = ContextVar("sluice_phase", default=None)


@contextmanager
def phase(name: str, step: int, timeout_s: float, output_dir: Path) -> Iterator[None]:
    """Bound every `get` inside to `timeout_s` seconds from now, in total."""
    current = _Phase(name, step, timeout_s, time.monotonic() + timeout_s, output_dir / "stuck")
    token = _current.set(current)
    try:
        yield
    finally:
        _current.reset(token)


def get(refs: Any) -> Any:
    """`ray.get(refs)` (one reference or a list) within the current phase's deadline."""
    current = _current.get()
    if current is None:
        return ray.get(refs)
    single = isinstance(refs, ray.ObjectRef)
    ordered = [refs] if single else list(refs)
    values, pending = {}, ordered
    while pending:
        remaining = max(0.0, current.deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
        if not ready:
            raise _stuck(current, pending)
        values[ready[0]] = ray.get(ready[0])  # a failure surfaces now, not at the deadline
    return values[refs] if single else [values[ref] for ref in ordered]


def renew() -> None:
    """Give the current phase its whole bound again, from now: the work of an actor that was
    stuck and replaced (`RolloutGroup`) starts over on another, and gets the time it had."""
    current = _current.get()
    if current is not None:
        _current.set(replace(current, deadline=time.monotonic() + current.timeout_s))


def check(waiting_for: str) -> None:
    """Raise `PhaseTimeout` if the current phase is past its deadline (for loops that poll
    rather than wait on a reference); `waiting_for` says what they wait for."""
    current = _current.get()
    if current is not None and time.monotonic() > current.deadline:
        raise PhaseTimeout(
            f"{current.name} of step {current.step} did not finish within "
            f"timeouts.{current.name}_s={current.timeout_s:g} s; still waiting for {waiting_for}"
        )


def _stuck(current: _Phase, pending: list[ray.ObjectRef]) -> PhaseTimeout:
    actors, note = _actors_of(pending)
    folder = current.dump_root / f"step{current.step}-{current.name}"
    folder.mkdir(parents=True, exist_ok=True)
    here = ray.get_runtime_context().get_node_id()
    named = []
    for actor in actors:
        label = f"{actor.name} (pid {actor.pid})"
        if actor.node_id == here:
            (folder / f"{actor.name}.txt").write_text(_stack(actor.pid))
        else:
            label += f" on node {actor.node_id[:12]}: see the dashboard's stack view"
        named.append(label)
    return PhaseTimeout(
        f"{current.name} of step {current.step} did not finish within "
        f"timeouts.{current.name}_s={current.timeout_s:g} s; still running: "
        f"{'; '.join(named) or note}; stacks in {folder}",
        stuck_actor_ids=frozenset(actor.actor_id for actor in actors),
    )


def _actors_of(pending: list[ray.ObjectRef]) -> tuple[list[Any], str]:
    """The actors whose calls `pending` wait for (Ray's state API: name, pid, node), and a
    note for when it cannot say."""
    ids = {ref.task_id().actor_id().hex() for ref in pending}
    try:
        from ray.util.state import list_actors

        address = ray.get_runtime_context().gcs_address  # this run's cluster, not another
        listed = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=10_000)
    except Exception as error:  # the state API is served by the dashboard
        return [], f"{len(pending)} call(s) (Ray's state API is unavailable: {error})"
    found = sorted((a for a in listed if a.actor_id in ids), key=lambda a: a.name or "")
    return found, f"{len(pending)} call(s) of no live actor (tasks, or actors that died)"


def _stack(pid: int) -> str:
    """py-spy's dump of every thread of `pid` (installed with ray[default])."""
    py_spy = Path(sys.executable).with_name("py-spy")
    command = [str(py_spy) if py_spy.exists() else "py-spy", "dump", "--pid", str(pid)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PY_SPY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"py-spy could not run: {error}\n"
    return done.stdout + done.stderr
