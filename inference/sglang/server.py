"""One SGLang server process: start it, watch it, read its log, stop it.

`ServerProcess` runs on the node its `ServerLaunch` names (a RolloutActor for node_rank 0, a
`NodeServer` actor on every other node of a multi-node engine). The process writes stdout and
stderr to one log file, whose tail goes into every error about it, so a crash reads as
"engine 0 node_rank 1 exited with code 1: <last lines>" and not as a timeout.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from inference.sglang.launch import LAUNCH_MODULE, ServerLaunch

LOG_TAIL_LINES = 30
STOP_GRACE_S = 30.0
"""How long SGLang gets to exit after SIGTERM before the whole process group is killed."""


class EngineFailure(RuntimeError):
    """An SGLang server died or stopped answering; the message carries its log tail."""


class ServerProcess:
    """A `python -m sglang.launch_server` child process in its own process group.

    `program`: what runs the arguments (default: this interpreter with SGLang's launch
    module). The process group lets `stop` end SGLang's scheduler and detokenizer children
    too, which outlive a parent killed alone and would hold the GPUs.
    """

    def __init__(self, launch: ServerLaunch, log_dir: Path, program: list[str] | None = None):
        self.launch = launch
        self.program = program or [sys.executable, "-m", LAUNCH_MODULE]
        self.log_path = Path(log_dir) / f"sglang-engine{launch.engine}-node{launch.node_rank}.log"
        self.pid_path = self.log_path.with_suffix(".pid")
        """The running server's pid (= its process group), for the actor's next incarnation."""
        self._process: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return f"engine {self.launch.engine} node_rank {self.launch.node_rank}"

    def start(self) -> None:
        """Start the server (returns at once; `wait_healthy` waits for it)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._stop_leftover()
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": self.launch.visible_devices}
        with self.log_path.open("ab") as log:
            log.write(f"$ {self.launch.command}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                [*self.program, *self.launch.argv],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid_path.write_text(f"{self._process.pid}\n")

    def exit_code(self) -> int | None:
        """None while it runs (or before it started)."""
        return None if self._process is None else self._process.poll()

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with self.log_path.open(errors="replace") as log:
                return "".join(deque(log, maxlen=lines)).rstrip()
        except OSError as e:
            return f"(no log: {e})"

    def failure(self, what: str) -> EngineFailure:
        """An error naming this server, what went wrong, and the end of its log."""
        return EngineFailure(
            f"SGLang server of {self.name} on {self.launch.address} {what}; last lines of "
            f"{self.log_path}:\n{self.log_tail()}"
        )

    def check_alive(self) -> None:
        """Raise EngineFailure (with the log tail) if the process has exited."""
        code = self.exit_code()
        if code is not None:
            raise self.failure(f"exited with code {code}")

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after `grace_s`."""
        if self._process is None:
            return
        process, self._process = self._process, None
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace_s)
        _signal_group(process.pid, signal.SIGKILL)  # children left by a parent that exited
        process.wait()
        self.pid_path.unlink(missing_ok=True)

    def _stop_leftover(self) -> None:
        """Kill the server an earlier incarnation of this actor started: when Ray restarts a
        rollout actor whose process was killed, its server (in a session of its own, so that
        `stop` reaches SGLang's children) is still running and holding the GPUs."""
        try:
            group = int(self.pid_path.read_text())
        except (OSError, ValueError):
            return
        if _group_alive(group) and _leader_is(group, self.program[-1]):
            print(f"[{self.name}] stopping the server left by its previous actor (pid {group})")
            _signal_group(group, signal.SIGKILL)  # nobody owns it any more: no grace
            deadline = time.monotonic() + STOP_GRACE_S
            while _group_alive(group) and time.monotonic() < deadline:
                time.sleep(0.1)
        self.pid_path.unlink(missing_ok=True)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leader_is(group: int, program: str) -> bool:
    """Whether process group `group` is still a server's: its leader runs `program`, or has
    exited (Linux allocates no pid that is still a live group's id, so the group is ours)."""
    try:
        arguments = Path(f"/proc/{group}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return program.encode() in arguments


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


class NodeServer:
    """Ray actor holding the server of one non-first node of a multi-node engine."""

    def __init__(self, launch: ServerLaunch, log_dir: str, program: list[str] | None = None):
        self.server = ServerProcess(launch, Path(log_dir), program)

    def start(self) -> None:
        self.server.start()

    def check_alive(self) -> None:
        self.server.check_alive()

    def stop(self) -> None:
        self.server.stop()


def wait_healthy(url: str, servers: list, timeout_s: float, probe, poll_s: float = 1.0) -> float:
    """Wait until `probe(url)` is true; raise as soon as a server exits, or at the timeout.

    `servers`: objects with `check_alive()` (raises EngineFailure) and `failure(what)`, the
    first being the server that answers at `url`. Returns the seconds waited.
    """
    start = time.monotonic()
    while True:
        for server in servers:
            server.check_alive()
        if probe(url):
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise servers[0].failure(
                f"did not answer {url}/health within {timeout_s:g} s "
                f"(rollout.sglang.startup_timeout_s)"
            )
        time.sleep(poll_s)
