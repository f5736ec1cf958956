"""Named points where a fault drill makes an actor die or hang, at a known place in a step.

Tests (and anyone rehearsing a failure on a cluster) arm a point by writing a file into the
folder named by `SLUICE_FAULT_DIR`, which the actors' processes inherit from the Ray cluster's
environment. The file's name says where, its text what:

    <kind>.<verb>           any actor of that kind, e.g. `rollout.generate`
    <kind><index>.<verb>    one actor, e.g. `train0.broadcast_weights` (rank 0)

and `kill` (SIGKILL, as the OOM killer or a lost node ends a process; the default for an
empty file), `hang` (never returns, as a wedged kernel or a verifier that never answers), or
`raise` (an ordinary exception). The first process to reach an armed point takes the file
(an atomic rename to `<name>.<pid>`, so exactly one does, and the test can read which) and
acts. A point fires once per file; without `SLUICE_FAULT_DIR` a point costs one dict lookup.

The points sit at the start of an actor's verbs (`RolloutActor.generate`, `TrainActor.
broadcast_weights`, ...): each calls `reached(kind, index, verb)`.
"""

import os
import signal
import time
from pathlib import Path

FAULT_DIR_ENV = "SLUICE_FAULT_DIR"
ACTIONS = ("kill", "hang", "raise")


class InjectedFault(RuntimeError):
    """The `raise` action of an armed fault point."""


def reached(kind: str, index: int, verb: str) -> None:
    """Act on the fault armed for actor `kind` `index` at `verb`, if there is one."""
    folder = os.environ.get(FAULT_DIR_ENV)
    if not folder:
        return
    for name in (f"{kind}{index}.{verb}", f"{kind}.{verb}"):
        armed = Path(folder) / name
        claimed = armed.with_name(f"{name}.{os.getpid()}")
        try:
            os.rename(armed, claimed)  # exactly one process takes it
        except FileNotFoundError:
            continue
        _act(claimed.read_text().strip() or "kill", name)


def arm(folder: Path, point: str, action: str = "kill") -> Path:
    """Arm `point` (`<kind>[<index>].<verb>`) in `folder`; returns the file."""
    if action not in ACTIONS:
        raise ValueError(f"fault action {action!r}: one of {', '.join(ACTIONS)}")
    path = folder / point
    staging = path.with_name(f".{point}.new")
    staging.write_text(action)
    staging.rename(path)  # appears whole: a process never reads a half-written action
    return path


def fired(folder: Path, point: str) -> list[int]:
    """The pids of the processes that took `point` (one per time it was armed)."""
    return [int(p.suffix[1:]) for p in folder.glob(f"{point}.*") if p.suffix[1:].isdigit()]


def _act(action: str, name: str) -> None:
    print(f"[fault point] {name}: {action} (pid {os.getpid()})", flush=True)
    if action == "hang":
        while True:
            time.sleep(1)
    if action == "raise":
        raise InjectedFault(f"fault point {name} raised")
    os.kill(os.getpid(), signal.SIGKILL)
