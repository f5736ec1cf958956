"""`SglangEngine`: the InferenceEngine that runs SGLang servers and talks to them over HTTP.

One engine = one SGLang server spanning `rollout.gpus_per_engine` GPUs: a `launch_server`
process on each node it spans (`launch.server_launches`), started by the engine's RolloutActor
(node_rank 0, here) and by a `NodeServer` actor on every other node. Only node_rank 0 serves
HTTP. What waits for what:
- start-up: every process starts, then the engine waits for `/health` on node_rank 0, failing
  at once (with the log tail) if any process exits, or after `startup_timeout_s`;
- `generate`: one `/generate` request per prompt group through `SglangClient`, balanced over
  every engine's server (`connect_peers`; `drop_peer` when the driver finds an engine down),
  retried on another when one stops answering; once `should_stop` (the call was cancelled,
  `rollout.partial: abort`) every request out is aborted (`/abort_request`) and
  `GenerationAborted` raised;
- weight updates (the driver never overlaps them with `generate`): `/init_weights_update_group`
  with this engine's rank offset, then per bucket `/update_weights_from_distributed` while the
  trainer broadcasts it (SGLang receives one flat buffer per bucket), flushing the cache and
  setting the version on the last bucket, then `/model_info` must report that version;
- `ensure_running` (before each weight update): a server that exited, or failed
  `HEALTH_PROBES` health probes in a row (each allowed SGLang's own bound on /health), is
  reported with its log tail and restarted; it then rejoins the weight group, which the driver
  rebuilds.
"""

import random
import socket
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import ray
import requests

from config.schema import SluiceConfig
from inference.engine import (
    CACHE_MEMORY,
    WEIGHT_MEMORY,
    Completion,
    InferenceEngine,
    OnCompletion,
    SamplingParams,
)
from inference.sglang import requests as bodies
from inference.sglang.client import (
    AllEnginesDown,
    EngineUnreachable,
    SglangClient,
    answers_health,
)
from inference.sglang.launch import (
    DIST_INIT_PORTS,
    ResolvedServerArgs,
    read_num_experts,
    resolve_server_args,
    server_launches,
)
from inference.sglang.server import EngineFailure, NodeServer, ServerProcess, wait_healthy
from models.safetensors_io import SafetensorsReader
from placement.planner import Layout
from weights.errors import WeightSyncError
from weights.fp8_export import FP8_DTYPE_NAME
from weights.manifest import Bucket, plan_specs
from weights.process_group import GroupInfo
from weights.sync import SyncStats

SAFETENSORS_FP8 = "F8_E4M3"
"""How safetensors names torch.float8_e4m3fn in a file's header."""

MAX_GROUP = 64
"""Most prompts one /generate request carries (a GRPO group is usually 8-16)."""


@dataclass(frozen=True)
class EngineSite:
    """Where one engine runs, as its RolloutActor needs it to launch the servers."""

    layout: Layout
    gpu_ids: list[list[int]]
    """The real GPU ids of the engine's slots on each node it spans (Placement's probe)."""
    node_options: list[dict[str, Any]] = field(default_factory=list)
    """Ray actor options placing a `NodeServer` on each spanned node (entry 0 unused: the
    RolloutActor itself runs node_rank 0's server)."""


HEALTH_PROBES = 3
"""Failed probes in a row before a running engine counts as dead and is restarted."""

STARTUP_PROBE_TIMEOUT_S = 5
"""One probe while a server starts (polled until `startup_timeout_s`)."""


class _RemoteServer:
    """A NodeServer actor seen through the ServerProcess methods `wait_healthy` calls."""

    def __init__(self, handle: ray.actor.ActorHandle, name: str):
        self.handle = handle
        self.name = name

    def check_alive(self) -> None:
        ray.get(self.handle.check_alive.remote())

    def failure(self, what: str) -> EngineFailure:
        return EngineFailure(f"SGLang server of {self.name} {what}")


class SglangEngine(InferenceEngine):
    def __init__(
        self,
        config: SluiceConfig,
        engine_index: int,
        site: EngineSite,
        program: list[str] | None = None,
    ):
        """`program`: what runs the launch arguments (default: `python -m
        sglang.launch_server`; tests pass a stand-in that answers the same routes)."""
        self.config = config
        self.program = program
        self.index = engine_index
        self.site = site
        self.settings = config.rollout.sglang
        self.log_dir = Path(config.logging.output_dir).resolve() / "sglang"
        self.resolved = resolve_server_args(config, read_num_experts(config))
        for note in self.resolved.notes:
            print(f"[sglang engine {engine_index}] note: {note}", flush=True)
        self.url = self._start(self.resolved)
        self.weight_sessions = _has_weight_sessions(self.url)
        self.server_version = _server_version(self.url)
        sessions = "with" if self.weight_sessions else "without"
        print(
            f"[sglang engine {engine_index}] sglang {self.server_version}, {sessions} "
            f"weight-update sessions",
            flush=True,
        )
        routing = None
        if config.algorithm.routing_replay:
            from models.routing import replay_routing_shape

            routing = replay_routing_shape(config)
        self.client = SglangClient(
            [self.url],
            self.settings.request_timeout_s,
            self.settings.max_inflight_per_engine,
            routing=routing,
        )
        self.peers: list[str] = []
        self.group_name: str | None = None
        self.session_open = False
        self.weight_version = 0
        self.released: set[str] = set()
        """Memory regions released and not yet resumed (colocated)."""

    # --- servers -----------------------------------------------------------------------------

    def _start(self, resolved: ResolvedServerArgs) -> str:
        """Launch every node's server and wait for node_rank 0's /health; returns its URL."""
        port = _free_port()
        launches = server_launches(
            self.config,
            self.site.layout,
            self.index,
            resolved,
            port=port,
            dist_init_port=free_port_block(DIST_INIT_PORTS),
            gpu_ids=self.site.gpu_ids,
        )
        for launch in launches:
            print(f"[sglang engine {self.index}] {launch.command}", flush=True)
        self.local = ServerProcess(launches[0], self.log_dir, self.program)
        remote_class = ray.remote(NodeServer)
        self.remotes = [
            remote_class.options(**self.site.node_options[launch.node_rank]).remote(
                launch, str(self.log_dir), self.program
            )
            for launch in launches[1:]
        ]
        self.local.start()
        if self.remotes:  # (an empty ray.get would start a Ray instance where there is none)
            ray.get([r.start.remote() for r in self.remotes])
        url = f"http://{launches[0].address}:{port}"
        watched = [self.local] + [
            _RemoteServer(r, f"engine {self.index} node_rank {k + 1}")
            for k, r in enumerate(self.remotes)
        ]
        try:
            seconds = wait_healthy(url, watched, self.settings.startup_timeout_s, _healthy)
        except BaseException:
            # The servers run in their own sessions: they would outlive this actor and hold
            # the GPUs.
            self._stop_servers()
            raise
        print(f"[sglang engine {self.index}] serving at {url} after {seconds:.0f} s", flush=True)
        return url

    def ensure_running(self) -> bool:
        """Restart the servers if any has died or stopped answering; True if it restarted.

        A restarted engine holds its checkpoint's weights and has left the weight group: the
        driver rebuilds the group and syncs before it generates again.
        """
        try:
            self.local.check_alive()
            for remote in self.remotes:
                ray.get(remote.check_alive.remote())
            if self._answers_health():
                return False
            problem = self.local.failure(
                f"failed {HEALTH_PROBES} health probes in a row at {self.url}/health"
            )
        except EngineFailure as e:
            problem = e
        print(f"[sglang engine {self.index}] restarting: {problem}", flush=True)
        self._stop_servers()
        self.url = self._start(self.resolved)
        self.client.set_urls([self.url, *self.peers])
        self.weight_version = 0
        self.group_name = None
        self.session_open = False
        self.released = set()
        return True

    def _answers_health(self) -> bool:
        """Up to HEALTH_PROBES probes, each allowed SGLang's own bound: one slow or failed
        answer (a busy server) is no reason to restart a healthy engine."""
        for attempt in range(HEALTH_PROBES):
            if answers_health(self.url):  # within SGLang's own bound (HEALTH_TIMEOUT_S)
                return True
            print(
                f"[sglang engine {self.index}] {self.url}/health failed "
                f"({attempt + 1} of {HEALTH_PROBES})",
                flush=True,
            )
        return False

    def connect_peers(self, urls: list[str]) -> None:
        """Balance generation over every engine's server, this one's first."""
        self.peers = [u for u in urls if u != self.url]
        self.client.set_urls([self.url, *self.peers])

    def drop_peer(self, url: str) -> None:
        """Its engine went down: its server (which may outlive a killed actor, with weights
        no update reaches any more) gets no more requests from this engine."""
        self.peers = [u for u in self.peers if u != url]
        self.client.drop_url(url)

    def _stop_servers(self) -> None:
        self.local.stop()
        if self.remotes:
            ray.get([r.stop.remote() for r in self.remotes])
        for remote in self.remotes:
            ray.kill(remote)
        self.remotes = []

    def shutdown(self) -> None:
        self._stop_servers()

    # --- generation --------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        on_completion: OnCompletion | None = None,
    ) -> list[Completion]:
        """Completions in prompt order; runs of one repeated prompt go as one request.
        `on_completion` comes for a run's prompts as soon as its request returns (requests
        finish at different times), from the client's threads. `GenerationAborted` once
        `should_stop`: the requests out are aborted on their servers, nothing is kept."""
        groups = _runs(prompts)
        try:
            answered = self.client.generate(groups, params, on_completion, self.should_stop)
        except AllEnginesDown as e:
            raise self.local.failure(f"and every peer stopped answering ({e})") from e
        return [c for group in answered for c in group]

    # --- weights -----------------------------------------------------------------------------

    @property
    def weight_ranks(self) -> int:
        """Ranks this engine takes in the weight group: one per GPU (rank_offset + tp_rank)."""
        return self.config.rollout.gpus_per_engine

    def init_weights_update_group(self, info: GroupInfo, rank_offset: int) -> None:
        body = bodies.init_weights_update_group_body(info, rank_offset)
        reply = self._post(bodies.INIT_WEIGHTS_UPDATE_GROUP, body)
        bodies.parse_success(reply, f"engine {self.index} init_weights_update_group")
        self.group_name = info.group_name

    def destroy_weights_update_group(self) -> None:
        if self.group_name is None:
            return
        body = bodies.destroy_weights_update_group_body(self.group_name)
        self.group_name = None
        try:
            self._post(bodies.DESTROY_WEIGHTS_UPDATE_GROUP, body)
        except (EngineUnreachable, bodies.SglangError) as e:
            print(f"[sglang engine {self.index}] leaving the weight group: {e}", flush=True)

    def check_weights_update(self, plan: list[Bucket]) -> None:
        """Check the plan against the checkpoint, then open SGLang's weight-update session.

        Both happen before the trainer sends a byte (the driver waits for every engine's
        check): outside a session SGLang refuses `update_weights_from_distributed` without
        receiving its broadcast, which would leave the trainer waiting.
        """
        self._check_against_checkpoint(plan)
        if not self.weight_sessions:
            return
        if self.session_open:  # a failed transfer left it open
            self._post(bodies.END_WEIGHT_UPDATE, bodies.end_weight_update_body())
            self.session_open = False
        reply = self._post(bodies.BEGIN_WEIGHT_UPDATE, bodies.begin_weight_update_body())
        bodies.parse_success(reply, f"engine {self.index} begin_weight_update")
        self.session_open = True

    def _check_against_checkpoint(self, plan: list[Bucket]) -> None:
        """Every tensor of the plan must be one of the checkpoint's, with its shape, and in
        fp8 exactly where the checkpoint is (an FP8 checkpoint's weights; SGLang would
        otherwise fail after the transfer, or load a tensor into the wrong place)."""
        reader = SafetensorsReader(self.config.model.hf_checkpoint)
        problems = []
        for spec in plan_specs(plan):
            shape = reader.shape(spec.name)
            if shape is None:
                problems.append(f"{spec.name} is not in the checkpoint")
            elif shape != tuple(spec.shape):
                problems.append(f"{spec.name} is {list(spec.shape)}, not {list(shape)}")
            elif (spec.dtype == FP8_DTYPE_NAME) != (reader.dtype(spec.name) == SAFETENSORS_FP8):
                stored = reader.dtype(spec.name)
                problems.append(f"{spec.name} is sent as {spec.dtype}, stored as {stored}")
        if problems:
            more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
            raise WeightSyncError(
                f"engine {self.index}: the trainer's weights do not match "
                f"{self.config.model.hf_checkpoint}, which the SGLang server loaded: "
                f"{'; '.join(problems[:5])}{more}"
            )

    def update_weights_from_distributed(self, plan: list[Bucket], version: int) -> SyncStats:
        """One request per non-empty bucket, in plan order, while the trainer broadcasts it;
        the last flushes the cache and sets the version; then the session closes and the
        server must report `version`."""
        if self.group_name is None or (self.weight_sessions and not self.session_open):
            raise WeightSyncError(
                f"engine {self.index} cannot receive weights: call init_weights_update_group "
                f"and check_weights_update first"
            )
        start = time.perf_counter()
        sent = [b for b in plan if b.nbytes]
        for k, bucket in enumerate(sent):
            last = k == len(sent) - 1
            body = bodies.update_weights_from_distributed_body(
                bucket,
                self.group_name,
                flush_cache=last,
                weight_version=str(version) if last else None,
            )
            reply = self._post(bodies.UPDATE_WEIGHTS_FROM_DISTRIBUTED, body)
            bodies.parse_success(reply, f"engine {self.index} bucket {k + 1}/{len(sent)}")
        self.finish_weight_update(version)
        seconds = time.perf_counter() - start
        return SyncStats(version, sum(b.nbytes for b in plan), seconds, len(sent))

    def update_weights_from_tensor(self, handles: list[str], version: int | None) -> None:
        """One bucket by CUDA IPC handle (colocated): `handles[tp_rank]` points at the bucket
        packed on that rank's own GPU, and SGLang's TP worker `tp_rank` opens exactly that
        entry. `version` is given with the last bucket: it flushes the cache and sets the
        version."""
        if len(handles) != self.weight_ranks:
            raise WeightSyncError(
                f"engine {self.index} has {self.weight_ranks} ranks but got {len(handles)} CUDA "
                f"IPC handles: each rank opens the one packed on its own GPU"
            )
        if self.weight_sessions and not self.session_open:
            raise WeightSyncError(f"engine {self.index}: call check_weights_update first")
        body = bodies.update_weights_from_tensor_body(
            list(handles),
            load_format=bodies.FLATTENED_BUCKET,
            flush_cache=version is not None,
            weight_version=None if version is None else str(version),
        )
        reply = self._post(bodies.UPDATE_WEIGHTS_FROM_TENSOR, body)
        bodies.parse_success(reply, f"engine {self.index} update_weights_from_tensor")

    def finish_weight_update(self, version: int) -> None:
        """Close the session (where the server has them); the server must then report
        `version`."""
        if self.weight_sessions:
            reply = self._post(bodies.END_WEIGHT_UPDATE, bodies.end_weight_update_body())
            bodies.parse_success(reply, f"engine {self.index} end_weight_update")
            self.session_open = False
        reported = self.client.get(self.url, bodies.MODEL_INFO).get("weight_version")
        if reported != str(version):
            raise WeightSyncError(
                f"engine {self.index} reports weight version {reported!r} after syncing {version}"
            )
        self.weight_version = version

    def weight_checksums(self) -> dict[str, str]:
        raise WeightSyncError("SGLang's fused, sharded weights have no per-tensor checksums")

    def release_memory(self) -> None:
        """Free the GPU memory of weights, KV cache and CUDA graphs while colocated trainers
        step."""
        self._post(bodies.RELEASE_MEMORY_OCCUPATION, bodies.release_memory_occupation_body())
        self.released = {*WEIGHT_MEMORY, *CACHE_MEMORY}

    def resume_memory(self, regions: tuple[str, ...]) -> None:
        """Take back the released `regions` among those asked for (a server restarted since
        the release holds all of its memory already)."""
        tags = [tag for tag in regions if tag in self.released]
        if tags:
            body = bodies.resume_memory_occupation_body(tags)
            self._post(bodies.RESUME_MEMORY_OCCUPATION, body)
            self.released -= set(tags)

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            return self.client.post(self.url, path, body)
        except EngineUnreachable as e:
            self.local.check_alive()  # a dead server explains itself with its log tail
            raise self.local.failure(f"did not answer {path}: {e.reason}") from e


def _runs(prompts: list[list[int]]) -> list[list[list[int]]]:
    """Consecutive equal prompts grouped (a GRPO group), at most MAX_GROUP per group."""
    groups: list[list[list[int]]] = []
    for prompt in prompts:
        if groups and groups[-1][0] == prompt and len(groups[-1]) < MAX_GROUP:
            groups[-1].append(prompt)
        else:
            groups.append([prompt])
    return groups


def _has_weight_sessions(url: str) -> bool:
    """Whether the server has weight-update sessions (`/begin_weight_update`): sglang 0.5.23
    refuses an update outside one, sglang 0.5.17 (the GPU machine's) has no such route and
    takes updates as they come. A GET on the POST-only route answers 405 where it exists and
    404 where it does not, and changes nothing."""
    probe = url + bodies.BEGIN_WEIGHT_UPDATE
    try:
        status = requests.get(probe, timeout=STARTUP_PROBE_TIMEOUT_S).status_code
    except requests.RequestException as e:
        raise EngineFailure(f"GET {probe} (which SGLang version?) failed: {e}") from e
    if status not in (HTTPStatus.METHOD_NOT_ALLOWED, HTTPStatus.NOT_FOUND):
        raise EngineFailure(
            f"GET {probe} answered {status}, not 405 (sglang 0.5.23: sessions) or 404 (0.5.17: "
            f"none); is something other than an SGLang server answering there?"
        )
    return status == HTTPStatus.METHOD_NOT_ALLOWED


def _server_version(url: str) -> str:
    """The SGLang version serving at `url` (`/server_info`), for the logs and the benchmarks;
    "unknown" from a server that does not say."""
    try:
        reply = requests.get(url + bodies.SERVER_INFO, timeout=STARTUP_PROBE_TIMEOUT_S)
        return str(reply.json().get("version", "unknown")) if reply.ok else "unknown"
    except (requests.RequestException, ValueError, AttributeError):
        return "unknown"


def _healthy(url: str) -> bool:
    """The start-up probe (polled until `startup_timeout_s`)."""
    return answers_health(url, STARTUP_PROBE_TIMEOUT_S)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


PORT_BLOCK_RANGE = (10000, 32000)
"""Where `free_port_block` looks: below Linux's ephemeral range (32768 up), so a client
connection cannot take a port of the block between the check and SGLang's bind."""


def free_port_block(size: int, attempts: int = 200) -> int:
    """The first of `size` consecutive ports that are all free now (SGLang binds a DP-attention
    server's ports upward from `--dist-init-addr`'s)."""
    low, high = PORT_BLOCK_RANGE
    for _ in range(attempts):
        first = random.randrange(low, high - size)
        try:
            with ExitStack() as stack:
                for port in range(first, first + size):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind(("", port))
        except OSError:
            continue
        return first
    raise EngineFailure(f"no {size} consecutive free ports in {low}-{high} on this node")
