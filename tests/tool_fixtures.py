"""Tools for tests/test_tools.py, each misbehaving in one way (imported by the tool workers)."""

import os
import signal
import sys
import time


def echo(text: str) -> str:
    return text


def add(a: int, b: int) -> dict:
    """A value that is not a str: the model sees it as JSON."""
    return {"sum": a + b}


def sleep(seconds: float) -> str:
    """A tool that hangs (past the pool's timeout)."""
    time.sleep(seconds)
    return "woke up"


def die() -> str:
    """A tool whose process is killed in the call (the OOM killer, a segfault in C code)."""
    os.kill(os.getpid(), signal.SIGKILL)
    return "unreachable"


def kill_tool_actor() -> str:
    """A tool that kills its tool actor (the worker's parent) in the call, as a lost node
    would: the call is answered by the actor's death, whenever Ray notices it."""
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(60)  # the actor's end ends this worker too (it reads the pipe's EOF)
    return "unreachable"


def allocate(megabytes: int) -> str:
    """A tool that allocates (and touches) `megabytes` of memory."""
    block = bytearray(megabytes * 2**20)
    return f"allocated {len(block)} bytes"


def fail(message: str) -> str:
    raise ValueError(message)


def worker_parent() -> int:
    """The pid of the process that started this worker: its tool actor."""
    return os.getppid()


def heavy_modules() -> list:
    """Which of Ray and torch this worker process has imported (it should have neither)."""
    return sorted(name for name in ("ray", "torch") if name in sys.modules)
