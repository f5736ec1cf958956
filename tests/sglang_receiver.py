"""SGLang's receiving side of a weight broadcast, for tests, in two forms.

1. `receive_buckets` (and `receive_in_process`, its target for a spawned process): an SGLang
   engine rank on the CPU. It builds SGLang's own model-runner `WeightUpdater` (sglang 0.5.23)
   and calls its real `init_weights_update_group` and `receive_weights_from_distributed(...,
   load_format="flattened_bucket")` per bucket, so the join (`init_custom_process_group`) and
   each receive (`FlattenedTensorBucket.empty` + one `torch.distributed.broadcast`) are
   SGLang's code, not ours.
2. `serve(port)` / `python -m tests.sglang_receiver --port P`: a RECORDING TEST DOUBLE of an
   SGLang server's HTTP control endpoints. It is NOT SGLang: no model, no scheduler, no
   generation. What it takes from SGLang: the routes and methods, the request classes (each
   JSON body is validated by its `io_struct` class through pydantic, as FastAPI does, an invalid
   one answered 422), the replies, the weight-update session rule, and, for
   `/init_weights_update_group` and `/update_weights_from_distributed`, the real
   `WeightUpdater` methods, so the trainer's broadcast flows into SGLang's code (and for
   `/update_weights_from_tensor`, SGLang's own deserializer and flattened-bucket views, run
   once per TP rank (`--tp-size`) on that rank's entry). Test-only routes (underscore names):
   `GET /_recorded` lists every valid call (path and body), `GET /_received[?tp_rank=k]`
   gives `{name: sha256 of the bytes}` of every tensor rank k (default 0) received. With `--port 0`
   the server picks a free port; either way its first line on stdout is `listening on PORT`,
   printed once sglang is imported and the port is bound. `spawn_server()` starts one so.

sglang is imported inside functions: it takes about 10 s, and only engine processes need it.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import torch
import torch.distributed as dist

BucketFields = tuple[list[str], list[str], list[list[int]]]
"""One bucket as SGLang's request carries it: names, dtypes, shapes."""

Received = dict[str, tuple[str, list[int], bytes]]
"""Tensors by name: dtype name, shape, raw bytes (for bit-exact comparisons)."""

INITIAL_WEIGHT_VERSION = "default"
"""SGLang's `--weight-version` default, what `/model_info` reports before any update."""

WITHOUT_SESSIONS = "SGLANG_DOUBLE_WITHOUT_SESSIONS"
"""Set in the double's environment, it answers as sglang 0.5.17 (`make_server(sessions=False)`)."""

BEGIN_WEIGHT_UPDATE, END_WEIGHT_UPDATE = "/begin_weight_update", "/end_weight_update"

NO_SESSION = (
    "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()"
)
"""SGLang 0.5.23's reply to a weight update outside a session (it then joins no broadcast)."""


# ---- 1. an SGLang engine rank ------------------------------------------------------------


def init_default_group() -> None:
    """A 1-rank gloo default group: SGLang's `init_weights_update_group` asserts there is one."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def make_weight_updater(tp_rank: int = 0) -> Any:
    """SGLang's model-runner `WeightUpdater` for a CPU engine with no model.

    The two methods used here read only `tp_rank`, `device` and the group registry; every
    model hook is a stub that raises, so a test that reached one would fail loudly.
    """
    from sglang.srt.model_executor.model_runner_components.weight_updater import WeightUpdater

    def no_model(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("the SGLang test receiver has no model")

    return WeightUpdater(
        tp_rank=tp_rank,
        device="cpu",
        gpu_id=0,
        model_config=None,
        custom_weight_loaders={},
        get_model=no_model,
        update_model_fields=no_model,
        recapture_cuda_graph=no_model,
        get_model_runner=no_model,
    )


def receive_buckets(
    join: dict[str, Any], buckets: list[BucketFields], tp_rank: int = 0
) -> Received:
    """Join as SGLang does (`join`: the fields of `/init_weights_update_group`), receive every
    bucket with SGLang's flattened-bucket receive, and return what it reconstructed."""
    init_default_group()
    updater = make_weight_updater(tp_rank)
    ok, message = updater.init_weights_update_group(**join)
    if not ok:
        raise RuntimeError(message)
    received: Received = {}
    for names, dtypes, shapes in buckets:
        tensors = updater.receive_weights_from_distributed(
            names=names,
            dtypes=dtypes,
            shapes=shapes,
            group_name=join["group_name"],
            load_format="flattened_bucket",
        )
        received.update((name, _record(t)) for name, t in tensors)
    return received


def receive_in_process(
    results: Queue, join: dict[str, Any], buckets: list[BucketFields], tp_rank: int = 0
) -> None:
    """`receive_buckets` for a spawned process: puts `("ok", received)` or `("error", text)`."""
    try:
        results.put(("ok", receive_buckets(join, buckets, tp_rank)))
    except Exception as e:  # the parent reports it; a traceback here would be lost
        results.put(("error", f"{type(e).__name__}: {e}"))


def _record(tensor: torch.Tensor) -> tuple[str, list[int], bytes]:
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return str(tensor.dtype).removeprefix("torch."), list(tensor.shape), raw


# ---- 2. the recording HTTP test double -----------------------------------------------------


Reply = tuple[int, Any]
"""HTTP status and payload: JSON-able, or `str` for a plain-text body."""


@dataclass
class EngineDouble:
    """What the test double remembers; one per server, shared by its handler threads."""

    updater: Any
    tp_size: int = 1
    """The engine's TP ranks (`--tp-size`): a colocated update is decoded once per rank, from
    that rank's entry, as each of SGLang's TP workers does (the broadcast path has rank 0)."""
    weight_version: str = INITIAL_WEIGHT_VERSION
    session_open: bool = False
    paused: bool = False
    recorded: list[dict[str, Any]] = field(default_factory=list)
    received: dict[str, torch.Tensor] = field(default_factory=dict)
    """What rank 0 received; `received_by_rank` has the other ranks' colocated updates."""
    received_by_rank: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    update_lock: threading.Lock = field(default_factory=threading.Lock)
    """Serialises weight updates, as SGLang's `model_update_lock` does."""

    def init_group(self, req: Any) -> Reply:
        ok, message = self.updater.init_weights_update_group(
            req.master_address,
            req.master_port,
            req.rank_offset,
            req.world_size,
            req.group_name,
            req.backend,
        )
        return _success(ok, message)

    def destroy_group(self, req: Any) -> Reply:
        return _success(*self.updater.destroy_weights_update_group(req.group_name))

    def begin_update(self, _req: Any) -> Reply:
        if self.session_open:
            return _success(
                False, "a weight-update session is already open; call end_weight_update() first"
            )
        self.session_open = True
        return _success(True, "Success")

    def end_update(self, _req: Any) -> Reply:
        if not self.session_open:
            return _success(
                False, "no weight-update session is open; call begin_weight_update() first"
            )
        self.session_open = False
        return _success(True, "Success")

    def update_from_distributed(self, req: Any) -> Reply:
        """SGLang's scheduler path: receive with the real updater, then "load" (keep) them."""
        if not self.session_open:
            return _success(False, NO_SESSION)
        with self.update_lock:
            try:
                tensors = self.updater.receive_weights_from_distributed(
                    names=req.names,
                    dtypes=req.dtypes,
                    shapes=req.shapes,
                    group_name=req.group_name,
                    load_format=req.load_format,
                )
            except Exception as e:
                return _success(False, f"Failed to receive weights: {e}")
            with self.lock:
                self.received.update((name, t.clone()) for name, t in tensors)
        return _success(True, "Succeeded to update parameter online." + self._bump(req))

    def update_from_tensor(self, req: Any) -> Reply:
        """SGLang's decoding of a colocated update: each TP rank decodes its own entry,
        `serialized_named_tensors[tp_rank]`, through SGLang's `MultiprocessingSerializer`
        (CUDA-IPC / shared-memory handles to the trainer's tensors), then, for
        `flattened_bucket`, its `FlattenedTensorBucket` views; the tensors are kept (cloned)
        instead of loaded into a model."""
        if not self.session_open:
            return _success(False, NO_SESSION.replace("distributed", "tensor"))
        with self.update_lock:
            try:
                by_rank = {
                    tp_rank: _decode_entry(req.serialized_named_tensors[tp_rank], req.load_format)
                    for tp_rank in range(self.tp_size)
                }
            except Exception as e:
                return _success(False, f"Failed to decode the tensors: {e!r}")
            with self.lock:
                for tp_rank, tensors in by_rank.items():
                    kept = self.received if tp_rank == 0 else self.received_by_rank[tp_rank]
                    kept.update((name, t.clone()) for name, t in tensors)
        return _success(True, "Success" + self._bump(req))

    def update_version(self, req: Any) -> Reply:
        self.weight_version = req.new_version
        message = f"Weight version updated to {req.new_version}"
        return HTTPStatus.OK, {"success": True, "message": message, "new_version": req.new_version}

    def pause(self, _req: Any) -> Reply:
        self.paused = True
        return HTTPStatus.OK, {"message": "Generation paused successfully.", "status": "ok"}

    def resume_generation(self, _req: Any) -> Reply:
        self.paused = False
        return HTTPStatus.OK, {"message": "Generation continued successfully.", "status": "ok"}

    def memory(self, _req: Any) -> Reply:
        return HTTPStatus.OK, None  # SGLang's handler returns nothing: the body is `null`

    def flush_cache(self, _req: Any) -> Reply:
        return HTTPStatus.OK, "Cache flushed.\n"

    def model_info(self) -> dict[str, Any]:
        """SGLang's `/model_info` keys that a client reads; the weight version is the live one."""
        return {
            "model_path": "sluice-sglang-test-double",
            "served_model_name": "sluice-sglang-test-double",
            "tokenizer_path": None,
            "is_generation": True,
            "weight_version": self.weight_version,
            "load_format": "auto",
        }

    def received_hashes(self, tp_rank: int = 0) -> dict[str, str]:
        with self.lock:
            kept = self.received if tp_rank == 0 else self.received_by_rank.get(tp_rank, {})
            return {name: _sha256(t) for name, t in kept.items()}

    def _bump(self, req: Any) -> str:
        """Set the weight version a successful update carries; SGLang's message suffix."""
        if req.weight_version is None:
            return ""
        self.weight_version = req.weight_version
        return f" Weight version updated to {req.weight_version}."


def _decode_entry(text: str, load_format: str | None) -> list[tuple[str, torch.Tensor]]:
    """One TP rank's entry of `/update_weights_from_tensor`, decoded with SGLang's code."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

    monkey_patch_torch_reductions()
    payload = MultiprocessingSerializer.deserialize(text)
    if load_format != "flattened_bucket":
        return payload
    metadata = [
        FlattenedTensorMetadata(m.name, m.shape, m.dtype, m.start_idx, m.end_idx, m.numel)
        for m in payload["metadata"]
    ]
    bucket = FlattenedTensorBucket(flattened_tensor=payload["flattened_tensor"], metadata=metadata)
    return bucket.reconstruct_tensors()


def _success(ok: bool, message: str) -> Reply:
    status = HTTPStatus.OK if ok else HTTPStatus.BAD_REQUEST
    return status, {"success": ok, "message": message}


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(_record(tensor)[2]).hexdigest()


@dataclass(frozen=True)
class Route:
    """One endpoint: allowed methods, the `io_struct` class of its body, and its handler."""

    methods: tuple[str, ...]
    request: str | None
    """`io_struct` class name; None for routes without a JSON body."""

    handler: Callable[[EngineDouble, Any], Reply]


POST, GET_POST = ("POST",), ("GET", "POST")
ROUTES: dict[str, Route] = {
    "/init_weights_update_group": Route(
        POST, "InitWeightsUpdateGroupReqInput", EngineDouble.init_group
    ),
    "/destroy_weights_update_group": Route(
        POST, "DestroyWeightsUpdateGroupReqInput", EngineDouble.destroy_group
    ),
    BEGIN_WEIGHT_UPDATE: Route(POST, "BeginWeightUpdateReqInput", EngineDouble.begin_update),
    END_WEIGHT_UPDATE: Route(POST, "EndWeightUpdateReqInput", EngineDouble.end_update),
    "/update_weights_from_distributed": Route(
        POST, "UpdateWeightsFromDistributedReqInput", EngineDouble.update_from_distributed
    ),
    "/update_weights_from_tensor": Route(
        POST, "UpdateWeightsFromTensorReqInput", EngineDouble.update_from_tensor
    ),
    "/update_weight_version": Route(
        POST, "UpdateWeightVersionReqInput", EngineDouble.update_version
    ),
    "/pause_generation": Route(POST, "PauseGenerationReqInput", EngineDouble.pause),
    "/continue_generation": Route(
        POST, "ContinueGenerationReqInput", EngineDouble.resume_generation
    ),
    "/release_memory_occupation": Route(
        GET_POST, "ReleaseMemoryOccupationReqInput", EngineDouble.memory
    ),
    "/resume_memory_occupation": Route(
        GET_POST, "ResumeMemoryOccupationReqInput", EngineDouble.memory
    ),
    "/flush_cache": Route(GET_POST, None, EngineDouble.flush_cache),  # `?timeout=` only
}
"""SGLang 0.5.23's routes (`sglang/srt/entrypoints/http_server.py`) that the double serves."""


class Invalid(Exception):
    """A request FastAPI would answer 422; `errors` is its `detail` list."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__(errors)
        self.errors = errors


class Validators:
    """`pydantic.TypeAdapter` per `io_struct` class: how FastAPI validates SGLang's bodies."""

    def __init__(self) -> None:
        import pydantic
        from sglang.srt.managers import io_struct

        self._pydantic = pydantic
        self._adapters = {
            route.request: pydantic.TypeAdapter(getattr(io_struct, route.request))
            for route in ROUTES.values()
            if route.request is not None
        }

    def validate(self, request: str, raw: bytes) -> tuple[Any, Any]:
        """The request object and the JSON body, or `Invalid` with FastAPI-like errors."""
        if not raw.strip():
            raise Invalid([{"type": "missing", "loc": ["body"], "msg": "Field required"}])
        try:
            body = json.loads(raw)
        except ValueError as e:
            error = {"type": "json_invalid", "loc": ["body"], "msg": "JSON decode error"}
            raise Invalid([{**error, "ctx": {"error": str(e)}}]) from e
        try:
            return self._adapters[request].validate_python(body), body
        except self._pydantic.ValidationError as e:
            errors = e.errors(include_url=False)
            raise Invalid([{**err, "loc": ["body", *err["loc"]]} for err in errors]) from e


def _flush_cache_query(query: str) -> None:
    """SGLang's `/flush_cache` takes `timeout: float = Query(0.0, ge=0.0)`."""
    for value in parse_qs(query).get("timeout", []):
        try:
            ok = float(value) >= 0
        except ValueError:
            ok = False
        if not ok:
            error = {"type": "value_error", "loc": ["query", "timeout"], "input": value}
            raise Invalid([{**error, "msg": "Input should be a number >= 0"}])


class Handler(BaseHTTPRequestHandler):
    """Dispatches to `routes` (`ROUTES`, less the session routes for an 0.5.17 double) and the
    read-only GET routes; one thread per request."""

    engine: EngineDouble
    validators: Validators
    routes: dict[str, Route]

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        reads: dict[str, Callable[[], Any]] = {
            "/health": lambda: "",
            "/model_info": self.engine.model_info,
            "/_recorded": lambda: list(self.engine.recorded),
            "/_received": lambda: self.engine.received_hashes(int(query.get("tp_rank", ["0"])[0])),
        }
        if path in reads:
            self._send(HTTPStatus.OK, reads[path]())
        else:
            self._call("GET")

    def do_POST(self) -> None:
        self._call("POST")

    def _call(self, method: str) -> None:
        url = urlsplit(self.path)
        route = self.routes.get(url.path)
        if route is None:
            self._send(HTTPStatus.NOT_FOUND, {"detail": "Not Found"})
            return
        if method not in route.methods:
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"detail": "Method Not Allowed"})
            return
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            if route.request is None:
                _flush_cache_query(url.query)
                req, body = None, None
            else:
                req, body = self.validators.validate(route.request, raw)
        except Invalid as e:
            self._send(HTTPStatus.UNPROCESSABLE_ENTITY, {"detail": e.errors})
            return
        with self.engine.lock:
            self.engine.recorded.append({"path": url.path, "body": body})
        self._send(*route.handler(self.engine, req))

    def _send(self, status: int, payload: Any) -> None:
        if isinstance(payload, str):
            data, kind = payload.encode(), "text/plain; charset=utf-8"
        else:
            data, kind = json.dumps(payload, default=str).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read replies, not access logs."""


def make_server(
    port: int, host: str = "127.0.0.1", tp_size: int = 1, sessions: bool = True
) -> ThreadingHTTPServer:
    """The double, bound (port 0: any free one) but not yet serving; sglang imported first.
    `sessions=False` answers as sglang 0.5.17 does: no `/begin_weight_update` and
    `/end_weight_update` routes, and weight updates taken without a session."""
    init_default_group()
    engine = EngineDouble(make_weight_updater(), tp_size=tp_size)
    engine.received_by_rank = {rank: {} for rank in range(1, tp_size)}
    routes = dict(ROUTES)
    if not sessions:
        del routes[BEGIN_WEIGHT_UPDATE], routes[END_WEIGHT_UPDATE]
        engine.session_open = True  # (0.5.17 has no session rule: every update is taken)
    handler = type(
        "BoundHandler",
        (Handler,),
        {"engine": engine, "validators": Validators(), "routes": routes},
    )
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(port: int, host: str = "127.0.0.1", tp_size: int = 1, sessions: bool = True) -> None:
    """Run the double until killed; prints `listening on PORT` once requests can come."""
    server = make_server(port, host, tp_size, sessions)
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


def spawn_server(cwd: str | Path = ".") -> tuple[subprocess.Popen, str]:
    """Start `python -m tests.sglang_receiver --port 0` (from the repository root `cwd`) and
    wait until it listens; returns the process (kill it when done) and its base URL."""
    command = [sys.executable, "-W", "ignore", "-m", "tests.sglang_receiver", "--port", "0"]
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"the SGLang test double did not start (exit {proc.wait()})")
    return proc, f"http://127.0.0.1:{int(line.split()[-1])}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tp-size", type=int, default=1, help="TP ranks decoding IPC updates")
    # The other launch_server arguments Sluice passes (--model-path, ...) are ignored, so the
    # engine's own launch code can start this double in tests.
    args, _ = parser.parse_known_args()
    serve(args.port, args.host, args.tp_size, sessions=not os.environ.get(WITHOUT_SESSIONS))


if __name__ == "__main__":
    main()
