"""Ctrl-C and `ray job stop`: one clean stop at the next step boundary, or a forced one.

The first SIGINT or SIGTERM prints one line and asks the driver loop to stop once the current
step is done (it then saves a checkpoint when `checkpoint.save` is set, removes its actors
and placement groups, and the process exits 130 or 143). A second signal changes nothing:
one signal to the process group of `uv run` without a terminal arrives twice (the group's,
and the one uv forwards), and it must not interrupt the clean stop halfway. The third within
`FORCE_WINDOW_S` forces the stop, for a run that hangs: one line, and the process exits at
once (128 + that signal's number) without finishing the step or saving. The actors go with
it: those of a local cluster are the driver's own processes, killed before it exits; those on
a cluster the driver joined are ended by Ray with the driver's job.

Under `ray job stop` the signal is SIGTERM from Ray's job supervisor, which SIGKILLs the
driver `RAY_JOB_STOP_WAIT_TIME_S` seconds later (3 by default): the supervisor reads it from
its environment, which the job's runtime env sets (`env_vars`). `job_stop_wait_notice` says
at start-up when that is too short for the clean stop.
"""

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping

import psutil

from config.schema import TimeoutsConfig

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
FORCE_SIGNALS = 3
FORCE_WINDOW_S = 5.0
"""`FORCE_SIGNALS` stop signals within this many seconds force the stop."""

JOB_STOP_WAIT_VAR = "RAY_JOB_STOP_WAIT_TIME_S"
RAY_DEFAULT_JOB_STOP_WAIT_S = 3  # ray/dashboard/modules/job/job_supervisor.py (ray 2.60)
JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in the environment of a job's driver only."""


class StopRequest:
    """Counts every SIGINT and SIGTERM and acts on them from a thread of its own.

    Python runs a signal's handler in the main thread only between bytecodes, and runs it
    once for however many deliveries of that signal came meanwhile: a driver waiting in
    `ray.wait` would see three quick Ctrl-Cs as one, and a main thread stuck in native code
    would see none. So the handlers do nothing; CPython's C-level handler writes one byte per
    delivery to the wakeup pipe (`signal.set_wakeup_fd`), and the watcher thread reads them.
    """

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self.received: list[float] = []
        """`time.monotonic()` of the stop signals within the last `FORCE_WINDOW_S`."""
        self._wakeup_fd: int | None = None

    def install(self) -> None:
        """Take SIGINT and SIGTERM (again after `ray.init`, which sets its own SIGTERM handler
        that exits at once). Only the main thread can; elsewhere the defaults stay."""
        if threading.current_thread() is not threading.main_thread():
            return
        if self._wakeup_fd is None:
            read_fd, self._wakeup_fd = os.pipe()
            os.set_blocking(self._wakeup_fd, False)  # a signal handler must never block
            threading.Thread(
                target=self._watch, args=(read_fd,), name="sluice-stop-signals", daemon=True
            ).start()
        signal.set_wakeup_fd(self._wakeup_fd, warn_on_full_buffer=False)
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, _counted_by_the_watcher)

    def _watch(self, read_fd: int) -> None:
        while True:
            for signum in os.read(read_fd, 64):
                if signum in STOP_SIGNALS:
                    self._handle(signal.Signals(signum))

    def _handle(self, received: signal.Signals) -> None:
        now = time.monotonic()
        self.received = [t for t in self.received if now - t < FORCE_WINDOW_S] + [now]
        if self.signal is None:
            self.signal = received
            print(
                f"sluice: {received.name} received: stopping after the current step",
                file=sys.stderr,
                flush=True,
            )
        elif len(self.received) >= FORCE_SIGNALS:
            _force_exit(received)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended."""
        return 128 + int(self.signal) if self.signal is not None else 0


def _counted_by_the_watcher(_signum: int, _frame: object) -> None:
    """Replaces Python's KeyboardInterrupt and Ray's exit; `StopRequest` acts instead."""


def _force_exit(last: signal.Signals) -> None:
    """Exit now: no `finally`, no atexit (the clean path is what hangs). The driver's own
    processes (a local Ray cluster: its daemons and the actors' workers) are killed first; Ray
    would kill its daemons at the driver's death, but its agents would then wait a minute for
    the dead GCS. Actors on a cluster the driver joined end with the driver's job."""
    print(
        f"sluice: {FORCE_SIGNALS} stop signals within {FORCE_WINDOW_S:g} s: forced stop, "
        f"the current step is lost; exiting {128 + int(last)}",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()
    os._exit(128 + int(last))


def job_stop_wait_s(timeouts: TimeoutsConfig, shutdown_s: float) -> int:
    """Seconds a clean stop may take under the phase timeouts: the rest of a step (its
    generation, training, the wait for generations running ahead, which is a rollout phase
    again, and the weight sync), a checkpoint, and the actors' shutdown."""
    step_s = 2 * timeouts.rollout_s + timeouts.train_s + timeouts.sync_s
    return math.ceil(step_s + timeouts.save_s + shutdown_s)


def job_stop_wait_notice(
    timeouts: TimeoutsConfig, shutdown_s: float, environ: Mapping[str, str] = os.environ
) -> str | None:
    """A warning when this process is a Ray job's driver that `ray job stop` would SIGKILL
    before its clean stop can end; None when it is not a job or the wait is long enough."""
    if JOB_CONFIG_VAR not in environ:
        return None
    needed = job_stop_wait_s(timeouts, shutdown_s)
    fix = json.dumps({"env_vars": {JOB_STOP_WAIT_VAR: str(needed)}})
    fix = f"submit with --runtime-env-json '{fix}' (up to {needed} s under the timeouts.* bounds)"
    value = environ.get(JOB_STOP_WAIT_VAR)
    try:
        wait_s = RAY_DEFAULT_JOB_STOP_WAIT_S if value is None else int(value)
    except ValueError:  # Ray's supervisor fails the same int() and its job is killed at once
        return (
            f"`ray job stop` kills this job at once: Ray cannot read {JOB_STOP_WAIT_VAR}="
            f"{value!r} (not an integer) for a clean stop; {fix}"
        )
    if wait_s >= needed:
        return None
    default = " (Ray's default)" if value is None else ""
    return (
        f"`ray job stop` SIGKILLs this job {JOB_STOP_WAIT_VAR}={wait_s} s{default} after its "
        f"SIGTERM, before the current step, the checkpoint and the shutdown can finish; {fix}"
    )
