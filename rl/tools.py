"""Running a model's tool calls: in worker processes of a Ray actor on the caller's node, each
call bounded in time and memory, and the built-in Python tool.

The contract of a tool (named in a `tools` mapping, name the model uses -> path)::

    def my_tool(query: str, limit: int = 5) -> str | <anything json.dumps can write>:
        ...

- It is named as `module:function`, e.g. `rl.tools:python`, or `my_tools:search` for a
  `my_tools.py` in the job's working directory; the module must import on the machines that
  run the rollout actors (`ToolPool` imports it once at start, so a bad path fails there with
  a `UserError` naming it and the fix).
- It is called with the model's arguments as keywords (`fn(**arguments)`); arguments that do
  not fit its signature are not passed to it (`error="bad_arguments"`).
- Its return value is what the model sees: a str as it is, anything else as `json.dumps` of it.
- It runs in a tool worker process (`python -m rl.tools`: plain Python, neither Ray nor torch
  imported), one call at a time, the worker's address space capped at `memory_mb` (RLIMIT_AS:
  an allocation past it raises MemoryError in the tool), each call bounded by `timeout_s`. The
  worker is its own process session: on a timeout the whole session (the tool's own
  subprocesses included) is killed with SIGKILL. Workers persist between calls: a tool may
  cache (a client, a loaded index) in module globals, and must not rely on a fresh process.

What each call gives (`ToolResult`; the episode sees `output`, never an exception):

- success: `error=None`, the value as text;
- the tool raised: `"exception"`, the exception's one line (`ValueError: no such key`);
- outlasted `timeout_s`: `"timeout"`; the worker is killed and replaced;
- the worker died in the call (SIGKILL, a segfault, `os._exit`, the kernel's OOM killer):
  `"crash"`; it is replaced. So is the tool actor if it died: the call gets `"crash"`, the
  next call finds or creates a new actor;
- a name not in `tools`: `"unknown_tool"`; arguments that are not a dict or do not bind to the
  function's signature: `"bad_arguments"`.
A hang or a crash costs that call only: the next call gets a working worker.

Where it runs and what waits for what: each rollout actor owns a `ToolPool`. The pool sends
each call to the node's `ToolActor`, a named Ray actor
(`<namespace_key>-tools-<node>-w<workers>-m<memory_mb>-g<actors lost>`: pools asking for other
worker counts or memory caps get their own) placed on the caller's node (soft node affinity),
found or created by name, so the pools of one key on one node share its workers. It is not
detached: it lives as long as the rollout actor that created it (its owner) and the job.
Sluice's rollout actors each use their own key (`sluice-rollout<index>-pid<pid>`), so each has
its own tool actor: one that dies (and is restarted by Ray) takes its tool workers with it, and
costs no other rollout actor's calls. `ToolPool.call` is a coroutine: the rollout actor's event
loop runs other episodes while it waits. In the actor, a call waits (in the actor's event loop,
no thread held) for an idle worker, then a thread of the actor's own executor (one per worker)
hands it over and waits for the answer or the timeout; calls beyond `workers` queue there in
arrival order, so a call's `seconds` (the caller's wall time) includes its wait for a worker.
Cancelling the caller's coroutine (an aborted episode) does not stop the call in the worker: it
runs to its end or its timeout, then the worker takes the next. A worker exits when its actor's
process ends, even in the middle of a call (a thread in it reads the request pipe and kills its
session on EOF).
"""

import asyncio
import contextlib
import functools
import importlib
import inspect
import json
import os
import queue
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

from config.errors import UserError

ToolError = Literal["timeout", "crash", "exception", "unknown_tool", "bad_arguments"]

START_TIMEOUT_S = 60.0
"""How long a new worker may take to start (it imports only this module; the tools' modules
are imported at their first call, within that call's time)."""

MAX_QUEUED_CALLS = 10_000
"""The tool actor's Ray concurrency: calls past the workers wait in the actor, not in Ray."""

PYTHON_TIMEOUT_S = 5.0
"""The built-in `python` tool's own time limit per run (below the pool's default 10 s, so the
model gets the tool's own "timed out" text with the output so far)."""

PYTHON_OUTPUT_CHARS = 4000
"""How much of a `python` run's output (stdout and stderr, interleaved) the model gets."""


@dataclass(frozen=True)
class ToolResult:
    output: str
    """What the model sees: the tool's value as text (str as is, else json.dumps), or one
    line saying what went wrong."""
    error: ToolError | None
    """None on success; else why the call gave no value (see the module docstring)."""
    seconds: float
    """Wall time of the call as the caller saw it (waiting for a worker included)."""


# --- loading a tool -----------------------------------------------------------------------------


def load_tool_fn(name: str, path: str) -> Callable[..., Any]:
    """Import the tool `name` from its `module:function` path (the attribute may be dotted).
    Raises UserError naming the tool and the fix for a malformed path, a module that fails to
    import, a missing attribute or one that is not callable."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise UserError(
            f"tool {name!r}: {path!r} is not of the form module:function (for example "
            f"rl.tools:python); fix the tool's path"
        )
    try:
        target = importlib.import_module(module_name)
    except Exception as error:
        raise UserError(
            f"tool {name!r}: cannot import module {module_name!r} ({_one_line(error)}); make "
            f"sure it imports from the job's working directory or an installed package"
        ) from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UserError(
                f"tool {name!r}: module {module_name!r} has no attribute {attribute!r}; check "
                f"the name after the ':' in {path!r}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise UserError(
            f"tool {name!r}: {path} is a {type(target).__name__}, not a function; point it at "
            f"a function called with the model's arguments as keywords"
        )
    return target


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# --- the worker process -------------------------------------------------------------------------


def _serve(memory_mb: int, request_fd: int, answer_fd: int) -> None:
    """A worker's life: cap its memory, say it is ready, then answer each call sent until the
    actor closes the request pipe."""
    limit = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the driver's to handle
    for fd in (request_fd, answer_fd):
        os.set_inheritable(fd, False)  # a process the tool starts must not hold our pipes
    answers = Connection(answer_fd, readable=False)
    answers.send(("ready",))
    requests: queue.SimpleQueue = queue.SimpleQueue()
    reader = Connection(request_fd, writable=False)
    threading.Thread(target=_read_requests, args=(reader, requests), daemon=True).start()
    tools: dict[str, Callable[..., Any]] = {}
    while True:
        path, arguments = requests.get()
        answers.send(_answer(tools, path, arguments))


def _read_requests(requests: Connection, calls: queue.SimpleQueue) -> None:
    """Hand calls to the main thread; once the actor closes the pipe (it ended), kill this
    worker's session, the tool's own subprocesses with it, even in the middle of a call."""
    try:
        while True:
            calls.put(requests.recv())
    except (EOFError, OSError):
        os.killpg(os.getpgrp(), signal.SIGKILL)


def _answer(tools: dict, path: str, arguments: dict) -> tuple[ToolError | None, str]:
    """(error, output) of one call; the tool's module is imported at its first call."""
    try:
        fn = tools.get(path) or tools.setdefault(path, load_tool_fn(path, path))
    except UserError as error:
        return "exception", str(error)
    problem = _argument_problem(fn, arguments)
    if problem is not None:
        return "bad_arguments", problem
    try:
        value = fn(**arguments)
    except BaseException as error:  # SystemExit too: the worker goes on
        return "exception", _one_line(error)
    if isinstance(value, str):
        return None, value
    try:
        return None, json.dumps(value)
    except (TypeError, ValueError) as error:
        return "exception", f"the tool returned {type(value).__name__}: {_one_line(error)}"


def _argument_problem(fn: Callable, arguments: dict) -> str | None:
    """Why `fn(**arguments)` cannot be called (one line naming the signature), or None."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # no introspectable signature: the call itself will tell
    try:
        signature.bind(**arguments)
    except TypeError as error:
        return f"{error}; the tool takes {signature}"
    return None


# --- the actor's side ---------------------------------------------------------------------------


class _WorkerGone(Exception):
    """The worker died while idle: not the call's doing, so it goes to a new worker."""


class _Worker:
    """One worker process (its own session) and its two pipes; used by one thread at a time."""

    def __init__(self, memory_mb: int):
        request_read, request_write = os.pipe()
        answer_read, answer_write = os.pipe()
        # The actor's own import path: the repository, the job's working directory, and
        # wherever Ray put the user's modules.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        command = [sys.executable, "-m", "rl.tools", str(memory_mb)]
        command += [str(request_read), str(answer_write)]
        self.process = subprocess.Popen(
            command, pass_fds=(request_read, answer_write), env=env, start_new_session=True
        )
        os.close(request_read)
        os.close(answer_write)
        self.requests = Connection(request_write, readable=False)
        self.answers = Connection(answer_read, writable=False)
        if not self.answers.poll(START_TIMEOUT_S) or self._recv() != ("ready",):
            self.kill()
            raise RuntimeError(f"a tool worker did not start within {START_TIMEOUT_S:g} s")

    def call(self, path: str, arguments: dict, timeout_s: float) -> tuple[ToolError | None, str]:
        """(error, output) of one call; raises _WorkerGone if the worker was dead before it."""
        try:
            self.requests.send((path, arguments))
        except OSError as error:  # BrokenPipeError: it died since its last call
            raise _WorkerGone(str(error)) from error
        if not self.answers.poll(timeout_s):
            return "timeout", f"timed out after {timeout_s:g} s"
        answer = self._recv()
        if answer is None:
            return "crash", f"crashed: its worker process died ({self._exit_status()})"
        return answer

    def _recv(self) -> tuple | None:
        try:
            return self.answers.recv()
        except (EOFError, OSError):
            return None

    def _exit_status(self) -> str:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "closed its pipe"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    def kill(self) -> None:
        """Kill the worker's whole session (the tool's subprocesses too)."""
        with contextlib.suppress(ProcessLookupError):  # already gone, its session with it
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.requests.close()
        self.answers.close()


def _start_or_none(memory_mb: int) -> "_Worker | None":
    """A started worker, or None (the next call starts one, and says why if it cannot)."""
    try:
        return _Worker(memory_mb)
    except Exception:
        return None


class ToolActor:
    """A node's tool workers, behind a Ray async actor (see `ToolPool`); never raises from
    `call`: whatever goes wrong is the call's (error, output)."""

    def __init__(self, workers: int, memory_mb: int):
        self.memory_mb = memory_mb
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="tool-worker")
        self._idle: asyncio.Queue[_Worker | None] = asyncio.Queue()
        for _ in range(workers):  # started now, so that the first calls do not wait for them
            self._idle.put_nowait(_start_or_none(memory_mb))

    async def call(
        self, path: str, arguments: dict, timeout_s: float
    ) -> tuple[ToolError | None, str]:
        worker = await self._idle.get()
        loop = asyncio.get_running_loop()
        # No await between taking the worker and handing it to a thread: once there, the
        # thread gives it back, even if this coroutine is cancelled.
        return await loop.run_in_executor(
            self._executor, self._run, loop, worker, path, arguments, timeout_s
        )

    async def pid(self) -> int:
        return os.getpid()

    def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        worker: "_Worker | None",
        path: str,
        arguments: dict,
        timeout_s: float,
    ) -> tuple[ToolError | None, str]:
        """One call (a thread of the executor); then the worker goes back to the idle queue,
        or, once it was lost, a new one is started in the background to take its place, so
        that the failed call's answer does not wait for it."""
        worker, answer = self._call_on(worker, path, arguments, timeout_s)
        if worker is None:
            self._executor.submit(self._refill, loop)
        else:
            loop.call_soon_threadsafe(self._idle.put_nowait, worker)
        return answer

    def _call_on(
        self, worker: "_Worker | None", path: str, arguments: dict, timeout_s: float
    ) -> "tuple[_Worker | None, tuple[ToolError | None, str]]":
        """One call on `worker` (a new one if it is None or was dead before the call); returns
        the worker for the next call (None: it was killed, after a timeout or a crash) and
        the answer."""
        try:
            worker = worker or _Worker(self.memory_mb)
            try:
                answer = worker.call(path, arguments, timeout_s)
            except _WorkerGone:
                worker.kill()
                worker = _Worker(self.memory_mb)
                answer = worker.call(path, arguments, timeout_s)
        except Exception as error:  # no worker would start: this call's loss, not the actor's
            if worker is not None:
                worker.kill()
            return None, ("crash", f"crashed: no tool worker would start ({_one_line(error)})")
        if answer[0] in ("timeout", "crash"):
            worker.kill()
            return None, answer
        return worker, answer

    def _refill(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_soon_threadsafe(self._idle.put_nowait, _start_or_none(self.memory_mb))


@functools.cache
def _remote_tool_actor():
    import ray  # here, not at the top: the worker processes import this module without Ray

    return ray.remote(ToolActor)


class ToolPool:
    """Owned by one rollout actor; runs tool calls in a Ray actor on the same node (one per node,
    shared by the rollout actors there: a named, detached-free actor found with get_if_exists).

    `tools` maps the name the model uses to the tool's `module:function` path; each is imported
    here once, so that a bad path fails the caller's start. `workers` worker processes per
    actor, `memory_mb` the address-space cap of each, `timeout_s` each call's limit (this pool's:
    pools sharing an actor may differ in it). `namespace_key` prefixes the actor's name.
    """

    def __init__(
        self,
        tools: dict[str, str],
        *,
        workers: int = 2,
        timeout_s: float = 10.0,
        memory_mb: int = 1024,
        namespace_key: str = "sluice",
    ):
        _check_settings(workers, timeout_s, memory_mb)
        for name, path in tools.items():
            load_tool_fn(name, path)
        self.tools = dict(tools)
        self.timeout_s = timeout_s
        self.workers = workers
        self.memory_mb = memory_mb
        self.namespace_key = namespace_key
        self._generation = 0
        """Tool actors this pool has lost: the next one's name is new, since a dead actor's
        name is released only some time after its death (get_if_exists would return it)."""
        self._actor = self._find_or_create_actor()

    async def call(self, name: str, arguments: dict) -> ToolResult:
        """Run tool `name` with `arguments`; never raises for anything the tool or its worker
        did (see the module docstring for each `error`)."""
        start = time.monotonic()
        error, output = await self._call(name, arguments)
        if error in ("timeout", "crash"):
            output = f"tool {name!r} {output}"
        elif error == "bad_arguments":
            output = f"tool {name!r}: {output}"
        return ToolResult(output, error, time.monotonic() - start)

    def close(self) -> None:
        """Let go of the actor (it is shared: it ends with its owner and the job)."""
        self._actor = None

    async def _call(self, name: str, arguments: dict) -> tuple[ToolError | None, str]:
        import ray

        if name not in self.tools:
            known = ", ".join(sorted(self.tools)) or "none"
            return "unknown_tool", f"no tool named {name!r}; the tools are: {known}"
        if not isinstance(arguments, dict):
            return "bad_arguments", f"arguments must be an object, not {type(arguments).__name__}"
        if self._actor is None:
            raise RuntimeError("ToolPool.call after close()")
        try:
            return await self._actor.call.remote(self.tools[name], arguments, self.timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as error:
            self._generation += 1
            self._actor = self._find_or_create_actor()  # a new one for the next call
            return "crash", f"crashed: its tool actor was lost ({type(error).__name__})"

    def _find_or_create_actor(self):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        name = (
            f"{self.namespace_key}-tools-{node}-w{self.workers}-m{self.memory_mb}"
            f"-g{self._generation}"
        )
        options = {
            "name": name,
            "get_if_exists": True,
            "num_cpus": 0,  # its workers run tool code in the caller's share of the node
            "max_concurrency": MAX_QUEUED_CALLS,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True),
        }
        try:
            return _remote_tool_actor().options(**options).remote(self.workers, self.memory_mb)
        except ValueError:  # another rollout actor created it between our lookup and create
            return ray.get_actor(name)


def _check_settings(workers: int, timeout_s: float, memory_mb: int) -> None:
    if workers < 1:
        raise UserError(f"ToolPool workers={workers} must be >= 1 (one call runs per worker)")
    if timeout_s <= 0:
        raise UserError(f"ToolPool timeout_s={timeout_s} must be > 0")
    if memory_mb < 64:
        raise UserError(f"ToolPool memory_mb={memory_mb} must be >= 64 (a Python process)")


# --- the built-in Python tool -------------------------------------------------------------------

_SANDBOX_PRELUDE = """\
import os, resource, socket, sys, threading
def _deadline():
    os._exit(124)
_timer = threading.Timer({limit_s}, _deadline)
_timer.daemon = True
_timer.start()
resource.setrlimit(resource.RLIMIT_CPU, ({cpu_s}, {cpu_s}))
def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the python tool")
class _LocalOnlySocket(socket.socket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None and family in (-1, socket.AF_INET, socket.AF_INET6):
            _no_network()
        super().__init__(family, type, proto, fileno)
socket.socket = _LocalOnlySocket
socket.getaddrinfo = socket.gethostbyname = socket.gethostbyname_ex = _no_network
_code = sys.stdin.read()
sys.stdin = open(os.devnull)
exec(compile(_code, "<code>", "exec"), {{"__name__": "__main__"}})
"""


def python(code: str, timeout_s: float = PYTHON_TIMEOUT_S) -> str:
    """Run `code` as a Python program; return what it printed (stdout and stderr interleaved,
    the first PYTHON_OUTPUT_CHARS characters), with a line for a non-zero exit or a timeout.

    Each call is a fresh `python -I` process (isolated mode: no PYTHONPATH, no user
    site-packages, no current directory on the path), in a new empty temporary directory
    (deleted after), with an environment of only PATH and a HOME in that directory (so no
    proxy settings, no credentials in variables), in its own process session, with no stdin.

    What it limits: wall time (`timeout_s`, also bounded by the pool's limit on the call: the
    process kills itself at its deadline even if the worker that started it is gone, and its
    session is killed), CPU time (RLIMIT_CPU), memory (the worker's RLIMIT_AS is inherited).
    Network, best effort: before the code runs, `socket.socket` is replaced by a subclass that
    raises PermissionError for a new IPv4 or IPv6 socket (so `create_connection`, urllib,
    http.client and the like fail with it; Unix sockets, as asyncio's `socketpair` uses,
    still work), and `getaddrinfo`, `gethostbyname` and `gethostbyname_ex` raise it too.

    What it does NOT isolate: the code runs as the same user with the same file-system access
    (it can read and write any file that user can, the temporary directory is only its working
    directory), it can start processes, and it can undo the network block (import `_socket`,
    reload `socket`, call `os` functions or a subprocess). It keeps honest model code from
    reaching the network by accident; it is not a security boundary against hostile code: run
    untrusted code in a container or VM around the rollout actors.
    """
    prelude = _SANDBOX_PRELUDE.format(limit_s=timeout_s, cpu_s=max(1, int(timeout_s) + 1))
    with tempfile.TemporaryDirectory(prefix="sluice-python-tool-") as home:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home}
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", prelude],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=home,
            env=env,
            start_new_session=True,
        )
        timed_out = False
        try:
            output, _ = process.communicate(code.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            timed_out = True
    text = _truncate(output.decode(errors="replace"))
    if timed_out or process.returncode == 124:  # our deadline, or its own (the prelude's)
        return text + f"\n[timed out after {timeout_s:g} s]"
    return text + (f"\n[exit code {process.returncode}]" if process.returncode else "")


def _truncate(text: str) -> str:
    if len(text) <= PYTHON_OUTPUT_CHARS:
        return text
    return text[:PYTHON_OUTPUT_CHARS] + f"\n[... {len(text) - PYTHON_OUTPUT_CHARS} more characters]"


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
