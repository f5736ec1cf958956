"""An HTTP client for a set of SGLang servers: balances `/generate` requests and retries them.

A rollout actor holds one `SglangClient` over every engine's URL, its own first. Generation is
spread over all live servers (whichever has the fewest requests in flight from this client) so
a slow or busy engine does not hold the whole batch back, and a server that stops answering is
marked down and its requests are sent elsewhere, so no prompt group is lost. A request given up
on is aborted on its server (`/abort_request`), so the server does not go on generating it into
the next weight update; a server marked down is probed again (`/health`) and comes back once
it answers, so one timeout does not take it out for the rest of the run. A generation told to
stop (`should_stop`, the rollout actor's cancel flag) aborts every request it has out and sends
no more.
"""

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import requests

from inference.engine import Completion, GenerationAborted, OnCompletion, SamplingParams
from inference.sglang.requests import (
    ABORT_REQUEST,
    GENERATE,
    HEALTH,
    SglangError,
    abort_body,
    error_message,
    generate_body,
    parse_generate_response,
)

if TYPE_CHECKING:
    from models.routing import RoutingShape

SGLANG_HEALTH_CHECK_S = 20
"""sglang 0.5.23's bound on its own /health (`HEALTH_CHECK_TIMEOUT`, env
SGLANG_HEALTH_CHECK_TIMEOUT, in entrypoints/http_server.py): /health runs a one-token
generation and answers 503 after that long."""

HEALTH_TIMEOUT_S = SGLANG_HEALTH_CHECK_S + 5
"""How long one probe of a running server waits: SGLang's bound, and a margin for the reply."""

REPROBE_INTERVAL_S = 30.0
"""A down server is probed again at most this often (and at once when every server is down)."""

ABORT_TIMEOUT_S = 5.0
"""One `/abort_request`; a server that does not answer it is down, and its requests with it."""

STOP_POLL_S = 0.1
"""How often a generation given `should_stop` asks it while it waits for its requests."""

ABORT_AGAIN_S = 1.0
"""A stopped generation's requests still out this long after their abort are aborted once more:
a request sent just before the stop may have reached its server after the first abort, which
SGLang ignores for a request id it does not know yet."""

Json = Any
"""A decoded JSON reply: a dict for most endpoints, a list for a batched `/generate`."""


class EngineUnreachable(RuntimeError):
    """A server did not answer: connection refused or dropped, timeout, or HTTP 5xx.

    `generate` retries such a request on another server; other callers decide for themselves.
    """

    def __init__(self, url: str, reason: str):
        super().__init__(f"SGLang server {url} is unreachable: {reason}")
        self.url = url
        self.reason = reason


class AllEnginesDown(RuntimeError):
    """No live server is left to send a request to."""

    def __init__(self, reasons: dict[str, str]):
        lines = [f"  {url}: {reason}" for url, reason in reasons.items()] or ["  (no URLs)"]
        super().__init__("every SGLang server is down:\n" + "\n".join(lines))
        self.reasons = dict(reasons)


class SglangClient:
    """Sends requests to SGLang servers; `generate` balances and retries over all live ones.

    Concurrency rule: every method may be called from any thread. One condition variable guards
    the server table (the URL list, which are down and why, the requests in flight per URL) and is
    never held during I/O. A `generate` request takes a slot on the live URL with the fewest
    requests in flight (the earliest in `urls` on a tie, so the caller's own engine first) and
    holds it until the reply; when every live URL has `max_in_flight` requests in flight it waits
    for a slot. `post` and `get` take no slot, so weight updates never queue behind generation.
    Each request opens and closes its own connection (no `requests.Session` is shared, as
    sessions are not documented as thread-safe); a connection costs far less than a generation.
    """

    def __init__(
        self,
        urls: list[str],
        timeout_s: float,
        max_in_flight: int,
        health_timeout_s: float = HEALTH_TIMEOUT_S,
        reprobe_interval_s: float = REPROBE_INTERVAL_S,
        routing: "RoutingShape | None" = None,
    ):
        """`urls`: base URLs such as `http://10.0.0.1:30000`, index 0 the caller's own engine.

        `timeout_s` bounds one request, a whole `/generate` batch included: a server slower than
        that is treated as unreachable. `max_in_flight` caps this client's concurrent
        `/generate` requests per server. A down server is probed with `/health` (each probe
        allowed `health_timeout_s`) at most every `reprobe_interval_s`. `routing`: ask for each
        completion's routed experts, of that shape (routing replay).
        """
        self.routing = routing
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.health_timeout_s = health_timeout_s
        self.reprobe_interval_s = reprobe_interval_s
        self._cond = threading.Condition()
        self._urls: list[str] = []
        self._in_flight: dict[str, int] = {}
        self._down: dict[str, str] = {}
        self._probed_at: dict[str, float] = {}  # when each down URL was last found down
        self.set_urls(urls)

    # --- the server table ----------------------------------------------------------------------

    def set_urls(self, urls: list[str]) -> None:
        """Replace the server list; all of the new URLs count as live.

        Requests already in flight finish where they are (their slots still count while the URL
        stays listed).
        """
        urls = [u.rstrip("/") for u in urls]
        if len(set(urls)) != len(urls):
            raise ValueError(f"duplicate SGLang URLs: {urls}")
        with self._cond:
            self._urls = urls
            self._in_flight = {u: self._in_flight.get(u, 0) for u in urls}
            self._down = {}
            self._probed_at = {}
            self._cond.notify_all()

    @property
    def urls(self) -> list[str]:
        """Every URL on the server list, down ones included, in the order given."""
        with self._cond:
            return list(self._urls)

    @property
    def live_urls(self) -> list[str]:
        """URLs not marked down, in the order given."""
        with self._cond:
            return [u for u in self._urls if u not in self._down]

    @property
    def down(self) -> dict[str, str]:
        """URLs marked down, each with the reason it was."""
        with self._cond:
            return dict(self._down)

    def mark_up(self, url: str) -> None:
        """Send requests to `url` again (e.g. after its engine restarted)."""
        url = url.rstrip("/")
        with self._cond:
            if url not in self._in_flight:
                raise ValueError(f"{url} is not one of this client's URLs: {self._urls}")
            self._down.pop(url, None)
            self._probed_at.pop(url, None)
            self._cond.notify_all()

    def mark_down(self, url: str, reason: str) -> None:
        """Stop sending `generate` requests to `url`; waiting requests pick another server."""
        url = url.rstrip("/")
        with self._cond:
            if url in self._in_flight:
                self._down[url] = reason
                self._probed_at[url] = time.monotonic()
            self._cond.notify_all()

    def drop_url(self, url: str) -> None:
        """Take `url` off the server list (its engine is gone; `set_urls` brings it back):
        unlike `mark_down`, no probe sends requests to it again. Its requests in flight finish
        where they are."""
        url = url.rstrip("/")
        with self._cond:
            self._urls = [u for u in self._urls if u != url]
            for table in (self._in_flight, self._down, self._probed_at):
                table.pop(url, None)
            self._cond.notify_all()

    def reprobe_down(self, force: bool = False) -> bool:
        """Probe `/health` of the down URLs last found down `reprobe_interval_s` ago or more
        (every down URL with `force`); those that answer 200 take requests again. Returns
        whether any URL is live now (another thread's probe may have brought it back)."""
        now = time.monotonic()
        with self._cond:
            due = [
                url
                for url, at in self._probed_at.items()
                if force or now - at >= self.reprobe_interval_s
            ]
        for url in due:
            healthy = answers_health(url, self.health_timeout_s)
            with self._cond:
                if url not in self._down:  # set_urls, mark_up or another probe meanwhile
                    continue
                if healthy:
                    del self._down[url], self._probed_at[url]
                else:
                    self._probed_at[url] = time.monotonic()
                self._cond.notify_all()
        return bool(self.live_urls)

    # --- single requests -----------------------------------------------------------------------

    def post(self, url: str, path: str, body: dict[str, Any]) -> Json:
        """POST `body` as JSON to `url + path` and return the decoded reply.

        Raises `EngineUnreachable` on a connection error, timeout or HTTP 5xx and `SglangError`
        with the server's message on HTTP 4xx. A `null` or empty reply is `{}`; a plain-text one
        is `{"message": text}`.
        """
        return self._send(url, path, "POST", body)

    def get(self, url: str, path: str) -> Json:
        """GET `url + path`; replies and errors as `post`."""
        return self._send(url, path, "GET", None)

    def _send(self, url: str, path: str, method: str, body: dict[str, Any] | None) -> Json:
        target = url.rstrip("/") + path
        try:
            response = requests.request(method, target, json=body, timeout=self.timeout_s)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise EngineUnreachable(url, f"{path}: {type(e).__name__}: {e}") from e
        except requests.exceptions.ChunkedEncodingError as e:  # connection dropped mid-reply
            raise EngineUnreachable(url, f"{path}: reply cut off: {e}") from e
        return _decode(url, path, response)

    # --- balanced generation -------------------------------------------------------------------

    def generate(
        self,
        groups: list[list[list[int]]],
        params: SamplingParams,
        on_completion: OnCompletion | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[list[Completion]]:
        """Completions for every prompt group, in input order (one list per group, per prompt).

        One `/generate` request per group, all sent concurrently and balanced over the live
        servers. A request whose server is unreachable is aborted there, marks that server down
        and goes to another (under new request ids). Down servers due a probe are probed first;
        when none is live, every down server is probed once more before `AllEnginesDown` is
        raised (also after a group has failed on as many servers as there are, twice over).
        `SglangError` (not retried) when a server refuses a request or aborts one.
        `on_completion(i, completion)` (i counts the prompts of all groups in order) is called
        for a group's prompts as soon as its request returns, in the thread that sent it.
        `should_stop` is asked every STOP_POLL_S, in the calling thread only, while requests are
        out; once it is true every request out is aborted on its server, no other is sent, and
        `GenerationAborted` is raised (the completions already returned are dropped).
        """
        if not groups:
            return []
        self.reprobe_down()
        workers = min(len(groups), self.max_in_flight * max(1, len(self._urls)))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sglang-generate")
        starts = list(accumulate((len(group) for group in groups), initial=0))
        out = _RequestsOut()
        try:
            futures = [
                pool.submit(self._generate_one, group, params, out, on_completion, first)
                for group, first in zip(groups, starts[:-1], strict=True)
            ]
            results = _results_in_order(futures, should_stop)
            if results is None:
                raise self._stop(out)
            return results
        finally:
            # On an error, queued groups are dropped and running ones finish in the background.
            pool.shutdown(wait=False, cancel_futures=True)

    def _stop(self, out: "_RequestsOut") -> GenerationAborted:
        """Abort every request `out` has on its server, now and, for those still out,
        ABORT_AGAIN_S later (in the background); the error `generate` raises."""
        stopped = out.stop()
        for url, rids in stopped:
            self._abort(url, rids)
        if stopped:
            retry = threading.Timer(ABORT_AGAIN_S, self._abort_still_out, (out,))
            retry.daemon = True
            retry.start()
        servers = sorted({url for url, _ in stopped})
        return GenerationAborted(
            f"generation stopped: {sum(len(rids) for _, rids in stopped)} SGLang request(s) "
            f"aborted on {servers or 'no server'}"
        )

    def _abort_still_out(self, out: "_RequestsOut") -> None:
        for url, rids in out.still_out():
            self._abort(url, rids)

    def _generate_one(
        self,
        group: list[list[int]],
        params: SamplingParams,
        out: "_RequestsOut",
        on_completion: OnCompletion | None = None,
        first: int = 0,
    ) -> list[Completion]:
        """One group's request, retried on another server until one answers; its completions
        are reported as prompts `first`, `first + 1`, ... (not once the generation stopped)."""
        completions = self._request_group(group, params, out, first)
        if on_completion is not None and not out.stopped:
            for offset, completion in enumerate(completions):
                on_completion(first + offset, completion)
        return completions

    def _request_group(
        self, group: list[list[int]], params: SamplingParams, out: "_RequestsOut", first: int = 0
    ) -> list[Completion]:
        failures = 0
        while True:
            try:
                url = self._acquire()
            except AllEnginesDown:
                if failures > 2 * len(self._urls) or not self.reprobe_down(force=True):
                    raise
                continue
            rids = [f"sluice-{uuid.uuid4().hex}-{i}" for i in range(len(group))]
            try:
                if not out.start(url, rids):
                    raise GenerationAborted("generation stopped before this request was sent")
                routed = bool(self.routing)
                body = generate_body(group, params, rids, routed_experts=routed, first=first)
                payload = self.post(url, GENERATE, body)
            except EngineUnreachable as e:
                if out.stopped:  # (nothing waits for it; its server is not to blame)
                    raise GenerationAborted("generation stopped") from e
                self.mark_down(url, e.reason)
                self._abort(url, rids)
                failures += 1
                continue
            finally:
                out.end(rids)
                self._release(url)
            try:
                return parse_generate_response(payload, group, self.routing)
            except SglangError as e:
                raise SglangError(f"{url}: {e}") from e

    def _abort(self, url: str, rids: list[str]) -> None:
        """Abort requests given up on, so the server stops generating them; a server that does
        not take the abort is down, and the requests went with it."""
        for rid in rids:
            try:
                requests.post(url + ABORT_REQUEST, json=abort_body(rid), timeout=ABORT_TIMEOUT_S)
            except requests.RequestException:
                return

    def _acquire(self) -> str:
        """A slot on the live URL with the fewest requests in flight; waits while all are full."""
        with self._cond:
            while True:
                live = [u for u in self._urls if u not in self._down]
                if not live:
                    raise AllEnginesDown(self._down)
                free = [u for u in live if self._in_flight[u] < self.max_in_flight]
                if free:
                    url = min(free, key=self._in_flight.__getitem__)  # first of equals wins
                    self._in_flight[url] += 1
                    return url
                self._cond.wait()

    def _release(self, url: str) -> None:
        with self._cond:
            if url in self._in_flight:  # set_urls may have dropped it meanwhile
                self._in_flight[url] = max(0, self._in_flight[url] - 1)
            self._cond.notify_all()


def answers_health(url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    """Whether the server at `url` answers GET /health with 200 within `timeout_s`."""
    try:
        return requests.get(url.rstrip("/") + HEALTH, timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


class _RequestsOut:
    """The `/generate` requests one `generate` call has sent and not yet had answered, by
    server, so that stopping the call can abort them; once stopped, no request is sent.
    Thread-safe: the call's worker threads add and remove, the calling thread stops."""

    def __init__(self):
        self._lock = threading.Lock()
        self._out: dict[str, tuple[str, list[str]]] = {}  # first rid -> (url, rids)
        self.stopped = False

    def start(self, url: str, rids: list[str]) -> bool:
        """Record a request about to go to `url`; False (do not send it) once stopped."""
        with self._lock:
            if self.stopped:
                return False
            self._out[rids[0]] = (url, rids)
            return True

    def end(self, rids: list[str]) -> None:
        """The request's reply came, or it was never sent."""
        with self._lock:
            self._out.pop(rids[0], None)

    def stop(self) -> list[tuple[str, list[str]]]:
        """Send nothing more; the requests out now, as (url, rids)."""
        with self._lock:
            self.stopped = True
            return list(self._out.values())

    def still_out(self) -> list[tuple[str, list[str]]]:
        with self._lock:
            return list(self._out.values())


def _results_in_order(
    futures: list[Future], should_stop: Callable[[], bool] | None = None
) -> list[Any] | None:
    """Every future's result, in order; the first error is raised as soon as it happens.
    None as soon as `should_stop()` (asked every STOP_POLL_S) is true."""
    pending = set(futures)
    poll_s = None if should_stop is None else STOP_POLL_S
    while pending:
        done, pending = wait(pending, timeout=poll_s, return_when=FIRST_EXCEPTION)
        for future in futures:
            error = future.exception() if future in done else None
            if error is not None:
                raise error
        if pending and should_stop is not None and should_stop():
            return None
    return [future.result() for future in futures]


def _decode(url: str, path: str, response: requests.Response) -> Json:
    """The reply's JSON, or the error it stands for."""
    payload = _json_or_text(response)
    status = response.status_code
    if status >= 500:
        raise EngineUnreachable(url, f"{path}: HTTP {status}: {error_message(payload)}")
    if status >= 400:
        raise SglangError(f"{path} on {url} was refused (HTTP {status}): {error_message(payload)}")
    if payload is None or payload == "":
        return {}
    if isinstance(payload, str):
        return {"message": payload}
    return payload


def _json_or_text(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:  # plain text (e.g. /flush_cache) or an empty body
        return response.text
