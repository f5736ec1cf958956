"""SglangClient: balancing, retry on a dead server, and errors, against local fake servers.

`FakeServer` is a test double, not SGLang: a stdlib HTTP server in a thread that answers
`/generate` with replies shaped like SGLang's (field names as in `test_sglang_requests.py`,
which checks them against sglang's code), each completion derived from its prompt so that the
order of results can be checked, `/health`, and `/abort_request` (recorded). It can be slowed
down, told to answer HTTP 500 or 400 (every request, or the next few `/generate` only), told to
hold every `/generate` until one of its request ids is aborted (then answered as SGLang answers
an aborted request), or killed (after some requests: it drops the connection of the next one
and stops listening, so later connections are refused). No SGLang code runs here, so these
tests carry no `sglang` marker.
"""

import contextlib
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from inference.engine import Completion, GenerationAborted, SamplingParams
from inference.sglang import requests as req
from inference.sglang.client import (
    ABORT_AGAIN_S,
    AllEnginesDown,
    EngineUnreachable,
    SglangClient,
)
from inference.sglang.requests import SglangError

PARAMS = SamplingParams(max_new_tokens=3)


def fake_completion(prompt: list[int], max_new_tokens: int, version: str = "default") -> dict:
    """A reply entry whose tokens are a function of the prompt alone."""
    tokens = [(sum(prompt) + i) % 1000 for i in range(max_new_tokens)]
    logprobs = [-0.5 * (i + 1) for i in range(max_new_tokens)]
    meta_info = {
        "id": f"rid-{sum(prompt)}",
        "finish_reason": {"type": "length", "length": max_new_tokens},
        "prompt_tokens": len(prompt),
        "weight_version": version,
        "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, tokens, strict=True)],
        "completion_tokens": max_new_tokens,
    }
    return {"text": "", "output_ids": tokens, "meta_info": meta_info}


def aborted_completion(prompt: list[int]) -> dict:
    """A reply entry for a request `/abort_request` ended (no tokens; SGLang's finish_reason)."""
    reply = fake_completion(prompt, 0)
    reply["meta_info"]["finish_reason"] = {
        "type": "abort",
        "message": "Abort before prefill",
        "status_code": None,
        "err_type": None,
    }
    return reply


HOLD_LIMIT_S = 60.0
"""The longest a held `/generate` waits for its abort (a test that never aborts fails first)."""


def expected(prompt: list[int]) -> Completion:
    reply = fake_completion(prompt, PARAMS.max_new_tokens)
    return Completion(reply["output_ids"], [-0.5, -1.0, -1.5], "length", weight_version=0)


class FakeServer:
    """A stand-in for one SGLang server (test double): see the module docstring."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.status = 200
        """HTTP status of every reply: 500 or 400 make it fail that way."""
        self.die_after: int | None = None
        """Serve this many `/generate` requests, then drop the next one's connection and die."""
        self.fail_next = 0
        """Answer this many of the next `/generate` requests with HTTP 500, then recover."""
        self.aborted: list[str] = []
        """The request ids `/abort_request` was called with."""
        self.hold_until_aborted = False
        """Hold each `/generate` until one of its request ids is aborted, then answer it as
        aborted (as SGLang does)."""
        self._abort_came = threading.Condition()
        self.before_reply: Callable[[dict], None] | None = None
        """Called with each `/generate` body before it is answered (a test may hold it)."""
        self.generate_count = 0
        self.bodies: list[dict] = []
        self.weight_version = "default"
        """What its replies report as `meta_info.weight_version`."""
        self.active = 0
        self.peak_active = 0
        """Most `/generate` requests this server worked on at once."""
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        self.alive = True

    def kill(self) -> None:
        """Stop listening: connections are refused from now on."""
        if self.alive:
            self.alive = False
            self._httpd.shutdown()
            self._httpd.server_close()

    def _admit(self) -> bool:
        """Count a `/generate` request; False when the server dies instead of answering it."""
        with self._lock:
            if self.die_after is not None and self.generate_count >= self.die_after:
                threading.Thread(target=self.kill, daemon=True).start()
                return False
            self.generate_count += 1
            return True

    def _work(self, seconds: float) -> None:
        with self._lock:
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)
        time.sleep(seconds)
        with self._lock:
            self.active -= 1

    def reply(self, path: str, body: dict) -> tuple[int, object]:
        if path == req.ABORT_REQUEST:
            with self._abort_came:
                self.aborted.append(body["rid"])
                self._abort_came.notify_all()
            return 200, None
        if self.status != 200:
            return self.status, {"error": {"message": f"fake failure {self.status}"}}
        if path == req.GENERATE and self.fail_next:
            self.fail_next -= 1
            return 500, {"error": {"message": "fake transient failure"}}
        if path == req.GENERATE:
            if self.before_reply is not None:
                self.before_reply(body)
            if self.hold_until_aborted:
                return 200, self._held_until_aborted(body)
            self._work(self.delay_s)
            sampling = body["sampling_params"]  # one for all prompts, or one per prompt
            n = (sampling[0] if isinstance(sampling, list) else sampling)["max_new_tokens"]
            return 200, [fake_completion(p, n, self.weight_version) for p in body["input_ids"]]
        if path == req.RELEASE_MEMORY_OCCUPATION:
            return 200, None
        if path == req.FLUSH_CACHE:
            return 200, "Cache flushed.\n"
        if path == req.UPDATE_WEIGHTS_FROM_DISTRIBUTED:
            return 400, {"success": False, "message": "Failed to update parameter online: x"}
        return 404, {"detail": "Not Found"}

    def _held_until_aborted(self, body: dict) -> list[dict]:
        with self._abort_came:
            self._abort_came.wait_for(lambda: set(body["rid"]) & set(self.aborted), HOLD_LIMIT_S)
        return [aborted_completion(prompt) for prompt in body["input_ids"]]

    def sent_rids(self) -> list[str]:
        """The request ids of every `/generate` it received, in order."""
        return [rid for body in self.bodies if "input_ids" in body for rid in body["rid"]]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"null")
                if self.path == req.GENERATE and not server._admit():
                    self.close_connection = True  # no reply: the client sees a dropped connection
                    return
                with server._lock:
                    server.bodies.append(body)
                status, payload = server.reply(self.path, body)
                if isinstance(payload, str):  # SGLang's /flush_cache answers plain text
                    data, kind = payload.encode(), "text/plain"
                else:
                    data, kind = json.dumps(payload).encode(), "application/json"
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.send_response(status)  # a client that timed out has hung up
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            def do_GET(self):  # /health: 200 unless told to fail every reply
                status = 200 if self.path == req.HEALTH and server.status == 200 else 503
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, *args):
                pass

        return Handler


@pytest.fixture
def servers():
    started: list[FakeServer] = []

    def start(*delays: float) -> list[FakeServer]:
        started.extend(FakeServer(d) for d in delays)
        return started[-len(delays) :]

    yield start
    for server in started:
        server.kill()


def groups_of(count: int, size: int = 2) -> list[list[list[int]]]:
    """`count` groups of one distinct prompt repeated `size` times."""
    return [[[g, g + 1, 7]] * size for g in range(count)]


def check_in_order(groups, results):
    assert len(results) == len(groups)
    for group, completions in zip(groups, results, strict=True):
        assert completions == [expected(prompt) for prompt in group]


def test_balances_over_two_fast_servers(servers):
    a, b = servers(0.02, 0.02)
    client = SglangClient([a.url, b.url], timeout_s=5, max_in_flight=4)
    groups = groups_of(40)
    check_in_order(groups, client.generate(groups, PARAMS))
    assert a.generate_count + b.generate_count == 40
    assert min(a.generate_count, b.generate_count) >= 12, (a.generate_count, b.generate_count)
    assert all(body["return_logprob"] and len(body["input_ids"]) == 2 for body in a.bodies)


def test_slow_server_gets_fewer(servers):
    fast, slow = servers(0.01, 0.25)
    client = SglangClient([slow.url, fast.url], timeout_s=5, max_in_flight=2)
    groups = groups_of(30)
    check_in_order(groups, client.generate(groups, PARAMS))
    assert slow.generate_count + fast.generate_count == 30
    assert slow.generate_count < fast.generate_count / 2, (slow.generate_count, fast.generate_count)


def test_ties_go_to_the_first_url(servers):
    a, b = servers(0.0, 0.0)
    client = SglangClient([b.url, a.url], timeout_s=5, max_in_flight=4)
    client.generate(groups_of(1), PARAMS)
    client.generate(groups_of(1), PARAMS)
    assert (b.generate_count, a.generate_count) == (2, 0)


def test_server_dying_mid_run_loses_nothing(servers):
    a, b = servers(0.02, 0.02)
    a.die_after = 5
    client = SglangClient([a.url, b.url], timeout_s=5, max_in_flight=3)
    groups = groups_of(30)
    check_in_order(groups, client.generate(groups, PARAMS))
    assert client.live_urls == [b.url]
    assert a.url in client.down and "generate" in client.down[a.url]
    assert (a.generate_count, b.generate_count) == (5, 25)  # each group answered once
    check_in_order(groups[:3], client.generate(groups[:3], PARAMS))  # the rest goes to b
    assert a.generate_count == 5


def test_http_500_is_retried_elsewhere(servers):
    a, b = servers(0.0, 0.0)
    a.status = 500
    client = SglangClient([a.url, b.url], timeout_s=5, max_in_flight=2)
    groups = groups_of(6)
    check_in_order(groups, client.generate(groups, PARAMS))
    assert client.live_urls == [b.url] and "HTTP 500" in client.down[a.url]
    client.mark_up(a.url)
    assert client.live_urls == [a.url, b.url]


def test_timeout_is_retried_elsewhere(servers):
    stuck, b = servers(2.0, 0.0)
    client = SglangClient([stuck.url, b.url], timeout_s=0.3, max_in_flight=1)
    groups = groups_of(3)
    check_in_order(groups, client.generate(groups, PARAMS))
    assert client.live_urls == [b.url] and "Timeout" in client.down[stuck.url]


def test_all_engines_down(servers):
    a, b = servers(0.0, 0.0)
    a.kill()
    b.kill()
    client = SglangClient([a.url, b.url], timeout_s=5, max_in_flight=2)
    with pytest.raises(AllEnginesDown) as err:
        client.generate(groups_of(4), PARAMS)
    assert set(err.value.reasons) == {a.url, b.url}
    assert a.url in str(err.value) and b.url in str(err.value)
    assert "ConnectionError" in err.value.reasons[a.url]
    assert client.live_urls == []


def test_http_4xx_is_an_sglang_error_and_not_retried(servers):
    a, b = servers(0.0, 0.0)
    a.status = 400
    client = SglangClient([a.url, b.url], timeout_s=5, max_in_flight=2)
    with pytest.raises(SglangError, match=r"HTTP 400.*fake failure 400"):
        client.generate(groups_of(1), PARAMS)
    assert (len(a.bodies), b.generate_count) == (1, 0)
    assert client.live_urls == [a.url, b.url]


def test_set_urls_replaces_the_list(servers):
    a, b = servers(0.0, 0.0)
    client = SglangClient([a.url], timeout_s=5, max_in_flight=2)
    a.status = 503  # its /health too: the probe before giving up finds it still down
    client.mark_down(a.url, "engine restarting")
    with pytest.raises(AllEnginesDown, match="engine restarting"):
        client.generate(groups_of(1), PARAMS)
    client.set_urls([b.url + "/", a.url])
    assert client.live_urls == [b.url, a.url] and client.down == {}
    check_in_order(groups_of(1), client.generate(groups_of(1), PARAMS))
    assert (a.generate_count, b.generate_count) == (0, 1)
    with pytest.raises(ValueError, match="duplicate"):
        client.set_urls([a.url, a.url + "/"])


def test_post_replies_and_errors(servers):
    (a,) = servers(0.0)
    client = SglangClient([a.url], timeout_s=5, max_in_flight=1)
    assert (
        client.post(a.url, req.RELEASE_MEMORY_OCCUPATION, req.release_memory_occupation_body())
        == {}
    )
    assert client.post(a.url, req.FLUSH_CACHE, req.flush_cache_body()) == {
        "message": "Cache flushed.\n"
    }
    with pytest.raises(SglangError, match="Failed to update parameter online"):
        client.post(a.url, req.UPDATE_WEIGHTS_FROM_DISTRIBUTED, {})
    a.kill()
    with pytest.raises(EngineUnreachable) as err:
        client.post(a.url, req.FLUSH_CACHE, req.flush_cache_body())
    assert err.value.url == a.url
    assert client.live_urls == [a.url]  # post reports; only generate marks servers down


def test_in_flight_cap_per_server(servers):
    (a,) = servers(0.05)
    client = SglangClient([a.url], timeout_s=5, max_in_flight=2)
    groups = groups_of(8)
    check_in_order(groups, client.generate(groups, PARAMS))
    assert a.peak_active == 2


def test_servers_that_each_failed_once_come_back(servers):
    """Every server fails one request (HTTP 500): all are marked down, probed again at once,
    found healthy, and the batch completes (it used to end in AllEnginesDown)."""
    a, b = servers(0.0, 0.0)
    a.fail_next = b.fail_next = 1
    client = SglangClient([a.url, b.url], timeout_s=5, max_in_flight=1)
    groups = groups_of(6)
    check_in_order(groups, client.generate(groups, PARAMS))
    assert client.down == {} and client.live_urls == [a.url, b.url]


def test_a_down_server_is_probed_again_after_the_interval(servers):
    a, b = servers(0.0, 0.0)
    a.fail_next = 1
    client = SglangClient([a.url, b.url], timeout_s=5, max_in_flight=4, reprobe_interval_s=0.3)
    check_in_order(groups_of(4), client.generate(groups_of(4), PARAMS))
    assert list(client.down) == [a.url]  # failed once, not yet due a probe
    time.sleep(0.4)
    served_before = a.generate_count
    check_in_order(groups_of(8), client.generate(groups_of(8), PARAMS))
    assert client.down == {} and a.generate_count > served_before


def test_a_request_given_up_on_is_aborted_on_its_server(servers):
    stuck, b = servers(2.0, 0.0)
    client = SglangClient([stuck.url, b.url], timeout_s=0.3, max_in_flight=1)
    check_in_order(groups_of(1, size=3), client.generate(groups_of(1, size=3), PARAMS))
    sent = stuck.bodies[0]["rid"]
    assert len(sent) == 3 and len(set(sent)) == 3
    assert stuck.aborted == sent  # every request of the group, by the id it was sent with
    assert set(b.bodies[0]["rid"]).isdisjoint(sent)  # retried under new ids


def test_a_retried_request_keeps_its_seeds(servers):
    """Each prompt's seed follows from the call's seed and the prompt's index in the call, so
    a group sent again (here after its server timed out) draws the same seeds."""
    from inference.engine import request_seed

    stuck, b = servers(2.0, 0.0)
    client = SglangClient([stuck.url, b.url], timeout_s=0.3, max_in_flight=1)
    seeded = SamplingParams(max_new_tokens=3, seed=41)
    groups = groups_of(2, size=3)
    check_in_order(groups, client.generate(groups, seeded))
    seeds = {
        tuple(body["input_ids"][0]): [sp["sampling_seed"] for sp in body["sampling_params"]]
        for body in b.bodies
    }
    assert seeds == {
        tuple(groups[0][0]): [request_seed(41, i) for i in (0, 1, 2)],
        tuple(groups[1][0]): [request_seed(41, i) for i in (3, 4, 5)],
    }
    (first_try,) = [body for body in stuck.bodies if "input_ids" in body]  # (and aborts)
    tried = [sp["sampling_seed"] for sp in first_try["sampling_params"]]
    assert tried == seeds[tuple(first_try["input_ids"][0])]


def test_each_completion_carries_the_version_of_the_server_that_generated_it(servers):
    """Requests are balanced over every engine's server, so a completion's weight version is
    the one its server reports, not the caller's engine's."""
    a, b = servers(0.05, 0.05)
    a.weight_version, b.weight_version = "4", "3"
    client = SglangClient([a.url, b.url], timeout_s=30, max_in_flight=1)
    groups = groups_of(4)
    results = client.generate(groups, PARAMS)
    served_by_b = {tuple(body["input_ids"][0]) for body in b.bodies}
    assert served_by_b and len(served_by_b) < len(groups)  # both servers answered
    for group, completions in zip(groups, results, strict=True):
        version = 3 if tuple(group[0]) in served_by_b else 4
        assert [c.weight_version for c in completions] == [version] * len(group)


def test_a_groups_completions_are_reported_as_soon_as_its_request_returns(servers):
    (server,) = servers(0.0)
    client = SglangClient([server.url], timeout_s=30, max_in_flight=2)
    groups = groups_of(2)  # prompts 0-1, then 2-3
    first_reported = threading.Event()
    held: list[bool] = []

    def hold_the_second_group(body):  # until the first group's completions are reported
        if body["input_ids"][0] == groups[1][0]:
            held.append(first_reported.wait(timeout=10))

    reported: dict[int, Completion] = {}

    def on_completion(index: int, completion: Completion) -> None:
        reported[index] = completion
        if index == 1:
            first_reported.set()

    server.before_reply = hold_the_second_group
    results = client.generate(groups, PARAMS, on_completion)
    check_in_order(groups, results)
    assert held == [True]  # reported while the other request was still out
    assert reported == dict(enumerate(c for group in results for c in group))


def test_a_stopped_generation_aborts_the_requests_it_has_out_and_sends_no_more(servers):
    """`rollout.partial: abort`: once `should_stop` says so, every request in flight is aborted
    on the server it went to, by its ids, the groups not yet sent never are, and
    GenerationAborted comes within a fraction of a second (the servers hold each request until
    it is aborted: without the abort the call would never return)."""
    a, b = servers(0.0, 0.0)
    arrived = threading.Semaphore(0)
    for server in (a, b):
        server.hold_until_aborted = True
        server.before_reply = lambda body: arrived.release()
    client = SglangClient([a.url, b.url], timeout_s=60, max_in_flight=2)
    stop = threading.Event()
    outcome: dict[str, BaseException] = {}

    def generate() -> None:
        try:
            client.generate(groups_of(10, size=3), PARAMS, should_stop=stop.is_set)
        except BaseException as e:  # (reported to the test's thread)
            outcome["error"] = e

    thread = threading.Thread(target=generate)
    thread.start()
    for _ in range(4):  # two requests out on each server; six groups wait for a slot
        assert arrived.acquire(timeout=10)
    stop.set()
    stopped_at = time.monotonic()
    thread.join(timeout=10)
    assert not thread.is_alive() and time.monotonic() - stopped_at < 2
    assert isinstance(outcome.get("error"), GenerationAborted)
    time.sleep(ABORT_AGAIN_S + 0.3)  # the freed slots send nothing; nothing is aborted twice
    for server in (a, b):
        assert server.generate_count == 2 and len(server.sent_rids()) == 6
        assert sorted(server.aborted) == sorted(server.sent_rids())
    assert client.live_urls == [a.url, b.url]  # an abort says nothing against a server
