"""Tool calls (`rl/tools.py`) on real Ray: the node's tool actor, its worker processes, the
built-in Python tool and the example HTTP tool (`examples/tools/http_tool.py`).

A call past the timeout, a worker killed in a call, an allocation past the memory cap and an
exception each cost that call only (an error result, never an exception in the caller), and
the next call works. The pool has one worker, so every call after a failure shows that the
worker was replaced. The tools are `tests/tool_fixtures.py`.
"""

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import ray

from config.errors import UserError
from rl.tools import ToolPool, ToolResult

TIMEOUT_S = 3.0
HANG_S = 600
"""How long the hung tool sleeps; the calls after it must not wait for it (a fraction of it,
for a worker's replacement on a busy machine)."""
MEMORY_MB = 512
TOOLS = {
    "echo": "tests.tool_fixtures:echo",
    "add": "tests.tool_fixtures:add",
    "sleep": "tests.tool_fixtures:sleep",
    "die": "tests.tool_fixtures:die",
    "kill_tool_actor": "tests.tool_fixtures:kill_tool_actor",
    "allocate": "tests.tool_fixtures:allocate",
    "fail": "tests.tool_fixtures:fail",
    "worker_parent": "tests.tool_fixtures:worker_parent",
    "heavy_modules": "tests.tool_fixtures:heavy_modules",
    "python": "rl.tools:python",
    "search": "examples.tools.http_tool:search",
}


class SearchService(BaseHTTPRequestHandler):
    """A JSON service: POST {"query": q} -> {"results": ["about q"]}; keeps what it was sent."""

    received: ClassVar[list] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        SearchService.received.append((self.headers["Content-Type"], body))
        answer = json.dumps({"results": [f"about {body['query']}"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def search_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), SearchService)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/search"
    server.shutdown()


@pytest.fixture(scope="module")
def pool(search_url):
    # The tool workers read the service's URL from their environment, as on a cluster.
    runtime_env = {"env_vars": {"SLUICE_SEARCH_URL": search_url}}
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env=runtime_env)
    pool = ToolPool(TOOLS, workers=1, timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB)
    yield pool
    pool.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def python_pool(pool):
    """The python tool under a longer limit on the call than its own (the process start is
    slow on a busy machine); the same actor as `pool` (only the calls' limit differs)."""
    python_pool = ToolPool({"python": "rl.tools:python"}, workers=1, memory_mb=MEMORY_MB)
    yield python_pool
    python_pool.close()


def call(pool: ToolPool, name: str, **arguments) -> ToolResult:
    return asyncio.run(pool.call(name, arguments))


def assert_works(pool: ToolPool) -> None:
    """The next call succeeds (on a new worker, after a failure)."""
    result = call(pool, "echo", text="still here")
    assert (result.output, result.error) == ("still here", None)
    assert result.seconds < HANG_S / 20


def test_a_call_returns_the_tools_value_as_text(pool):
    assert call(pool, "echo", text="hello").output == "hello"
    result = call(pool, "add", a=2, b=3)
    assert (result.output, result.error) == ('{"sum": 5}', None)
    assert result.seconds > 0
    assert call(pool, "heavy_modules").output == "[]"  # the worker is plain Python


def test_a_call_past_the_timeout_costs_that_call_only(pool):
    result = call(pool, "sleep", seconds=HANG_S)
    assert result.error == "timeout"
    assert result.output == f"tool 'sleep' timed out after {TIMEOUT_S:g} s"
    assert TIMEOUT_S <= result.seconds < HANG_S / 20
    assert_works(pool)


def test_a_worker_killed_in_a_call_costs_that_call_only(pool):
    result = call(pool, "die")
    assert result.error == "crash"
    assert "killed by SIGKILL" in result.output
    assert_works(pool)


def test_an_allocation_past_the_memory_cap_fails_that_call_only(pool):
    assert call(pool, "allocate", megabytes=16).error is None  # below the cap: fine
    result = call(pool, "allocate", megabytes=2 * MEMORY_MB)
    assert result.error in ("exception", "crash")
    assert "MemoryError" in result.output or result.error == "crash"
    assert_works(pool)


def test_an_exception_in_the_tool_is_its_one_line(pool):
    result = call(pool, "fail", message="no such key\nsecond line")
    assert (result.output, result.error) == ("ValueError: no such key", "exception")
    assert_works(pool)


def test_unknown_tools_and_bad_arguments_are_error_results(pool):
    result = call(pool, "missing")
    assert result.error == "unknown_tool"
    assert "'missing'" in result.output and "echo" in result.output
    result = call(pool, "echo", txt="hello")
    assert result.error == "bad_arguments"
    assert "(text: str) -> str" in result.output
    result = asyncio.run(pool.call("echo", ["hello"]))
    assert result.error == "bad_arguments"
    assert_works(pool)


def test_the_python_tool_runs_code_and_returns_its_output(python_pool):
    pool = python_pool
    assert call(pool, "python", code="print(6 * 7)").output == "42\n"
    result = call(pool, "python", code="import sys\nprint('oops', file=sys.stderr)\nsys.exit(3)")
    assert result.output == "oops\n\n[exit code 3]"
    long = call(pool, "python", code="print('x' * 10000)").output
    assert long.startswith("x" * 4000) and long.endswith("[... 6001 more characters]")


def test_the_python_tool_has_no_network(python_pool):
    pool = python_pool
    code = "import socket\nsocket.create_connection(('127.0.0.1', 9))"
    output = call(pool, "python", code=code).output
    assert "PermissionError: network access is disabled in the python tool" in output
    code = "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9')"
    assert "network access is disabled" in call(pool, "python", code=code).output
    code = "import asyncio\nprint(asyncio.run(asyncio.sleep(0, 'local sockets work')))"
    assert call(pool, "python", code=code).output == "local sockets work\n"


def test_the_python_tool_is_time_limited(python_pool):
    pool = python_pool
    result = call(
        pool, "python", code="print('started', flush=True)\nwhile True: pass", timeout_s=1
    )
    assert result.error is None  # the tool's own limit, inside the call's
    assert result.output == "started\n\n[timed out after 1 s]"
    assert result.seconds < pool.timeout_s


def test_the_http_tool_round_trip(pool, search_url):
    SearchService.received.clear()
    result = call(pool, "search", query="mixture of experts")
    assert (result.output, result.error) == ('{"results": ["about mixture of experts"]}', None)
    assert SearchService.received == [("application/json", {"query": "mixture of experts"})]


def test_pools_in_one_process_share_the_nodes_actor(pool):
    other = ToolPool(
        {"worker_parent": "tests.tool_fixtures:worker_parent"},
        workers=1,
        timeout_s=TIMEOUT_S,
        memory_mb=MEMORY_MB,
    )
    assert other._actor._actor_id == pool._actor._actor_id
    actor_pid = ray.get(pool._actor.pid.remote())
    assert call(other, "worker_parent").output == str(actor_pid)
    assert call(pool, "worker_parent").output == str(actor_pid)
    other.close()


def test_a_bad_tool_path_fails_the_pools_start_naming_it():
    with pytest.raises(UserError, match=r"tool 'x': .* has no attribute 'nope'"):
        ToolPool({"x": "tests.tool_fixtures:nope"})
    with pytest.raises(UserError, match=r"tool 'y': 'echo' is not of the form module:function"):
        ToolPool({"y": "echo"})


def test_a_lost_tool_actor_costs_one_call_and_a_new_one_takes_over(pool):
    # Killed from inside a call (a named point), not by ray.kill, which returns before the
    # actor is gone: a call right after it could still be answered by the old actor.
    result = call(pool, "kill_tool_actor")
    assert result.error == "crash"
    assert "its tool actor was lost" in result.output
    result = call(pool, "echo", text="found")
    assert (result.output, result.error) == ("found", None)
