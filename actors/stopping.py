"""Ctrl-C and `ray job stop`: one clean stop at the next step boundary.

The first SIGINT or SIGTERM prints one line and asks the driver loop to stop once the current
step is done (it then saves a checkpoint when `checkpoint.save` is set, removes its actors
and placement groups, and the process exits 130 or 143). Later signals change nothing: `uv
run` forwards a terminal's Ctrl-C, so the driver often receives two, and a second one must
not interrupt Ray's shutdown halfway.
"""

import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    def __init__(self) -> None:
        self.signal: signal.Signals | None = None

    def install(self) -> None:
        """Take SIGINT and SIGTERM (again after `ray.init`, which sets its own SIGTERM handler
        that exits at once). Only the main thread can; elsewhere the defaults stay."""
        if threading.current_thread() is threading.main_thread():
            for stop_signal in STOP_SIGNALS:
                signal.signal(stop_signal, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signal is not None:
            return
        self.signal = signal.Signals(signum)
        print(
            f"sluice: {self.signal.name} received: stopping after the current step",
            file=sys.stderr,
            flush=True,
        )

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended."""
        return 128 + int(self.signal) if self.signal is not None else 0
