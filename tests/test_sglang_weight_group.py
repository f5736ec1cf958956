"""Our trainer broadcasts into real SGLang weight-receiving code (sglang 0.5.23, on the CPU).

The engine side is SGLang's own `WeightUpdater` (`tests/sglang_receiver.py`): its
`init_weights_update_group` joins our group through `init_custom_process_group`, and its
flattened-bucket receive allocates `FlattenedTensorBucket.empty(...)` and makes one broadcast per
bucket. The trainer is this process: `init_weights_update_group(GroupInfo(checked=False))` and
`WeightSender.send`, as the driver will run them against SGLang servers.
"""

import hashlib
import json
import multiprocessing as mp
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests import sglang_receiver
from weights.manifest import Bucket, manifest_of, plan_buckets
from weights.process_group import (
    _STORE_DEVICE,
    GroupInfo,
    init_weights_update_group,
    pick_master_address_and_port,
)
from weights.sync import WeightReceiver, WeightSender

pytestmark = pytest.mark.sglang

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 90.0
"""Covers a spawned engine's sglang import (about 10 s, longer on a busy machine)."""

BUCKET_BYTES = 256


def weights() -> dict[str, torch.Tensor]:
    """Several dtypes, odd sizes, a scalar, a tensor bigger than a bucket, a 1-byte dtype."""
    g = torch.Generator().manual_seed(7)
    return {
        "embed.weight": torch.randn(7, 5, generator=g).bfloat16(),
        "norm.weight": torch.randn(3, generator=g).bfloat16(),  # 6 bytes: offsets stay even
        "scale": torch.randn((), generator=g),  # fp32 scalar
        "proj.weight": torch.randn(9, 11, generator=g),  # 396 bytes > a bucket: in place
        "proj.bias": torch.randn(11, generator=g).half(),
        "mask": torch.rand(5, generator=g) > 0.5,  # 5 bytes: an int64 after it would be misaligned
        "steps": torch.randint(0, 1 << 40, (3,), generator=g),  # int64
        "head.weight": torch.randn(4, 13, generator=g).bfloat16(),
    }


def plan_of(tensors: dict[str, torch.Tensor]) -> list[Bucket]:
    return plan_buckets(manifest_of(tensors.items()), BUCKET_BYTES)


def group_info(world_size: int, name: str) -> GroupInfo:
    address, port = pick_master_address_and_port()
    return GroupInfo(address, port, world_size, group_name=name, timeout_s=TIMEOUT_S, checked=False)


def join_fields(info: GroupInfo, rank_offset: int) -> dict[str, Any]:
    """The body of SGLang's `POST /init_weights_update_group` for this engine."""
    return {
        "master_address": info.master_address,
        "master_port": info.master_port,
        "rank_offset": rank_offset,
        "world_size": info.world_size,
        "group_name": info.group_name,
        "backend": info.backend,
    }


def update_body(info: GroupInfo, bucket: Bucket, weight_version: str | None = None) -> dict:
    """SGLang's `POST /update_weights_from_distributed` body for one bucket of our plan."""
    return {
        "names": bucket.names,
        "dtypes": bucket.dtypes,
        "shapes": bucket.shapes,
        "group_name": info.group_name,
        "load_format": "flattened_bucket",
        "weight_version": weight_version,
    }


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_the_plan_covers_the_cases():
    plan = plan_of(weights())
    assert len(plan) >= 4
    assert any(len(b.specs) > 1 for b in plan) and any(b.nbytes > BUCKET_BYTES for b in plan)
    assert {s.dtype for b in plan for s in b.specs} >= {"bfloat16", "float32", "bool", "int64"}


def test_our_store_prefix_is_the_device_torch_names_the_backend_after():
    """SGLang's members key their backend under the first device torch's `Backend` lists for
    it (`_new_process_group_helper`); ours must use the same, or the two never meet."""
    for backend, device in _STORE_DEVICE.items():
        assert dist.Backend.backend_capability[backend][0] == device


def test_sglang_weight_updater_receives_our_broadcast_bit_for_bit():
    """One SGLang engine of two TP ranks in spawned processes: both join with the engine's
    rank_offset 1 and SGLang adds each one's tp_rank (ranks 1 and 2 of a world of 3)."""
    tensors = weights()
    plan = plan_of(tensors)
    info = group_info(world_size=3, name="sluice_sglang_test")
    buckets = [(b.names, b.dtypes, b.shapes) for b in plan]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    engines = [
        ctx.Process(
            target=sglang_receiver.receive_in_process,
            args=(results, join_fields(info, rank_offset=1), buckets, tp_rank),
            daemon=True,
        )
        for tp_rank in (0, 1)
    ]
    for engine in engines:
        engine.start()
    try:
        group = init_weights_update_group(info, rank=0)  # gloo: returns once both have joined
        stats = WeightSender(group).send(plan, tensors.items(), version=3)
        outcomes = [results.get(timeout=TIMEOUT_S) for _ in engines]
    finally:
        for engine in engines:
            engine.join(timeout=10)
            if engine.is_alive():
                engine.kill()
    assert stats.buckets == len(plan)
    assert stats.nbytes == sum(len(raw(t)) for t in tensors.values())
    for status, received in outcomes:
        assert status == "ok", received
        assert received.keys() == tensors.keys()
        for name, tensor in tensors.items():
            dtype, shape, data = received[name]
            assert (dtype, shape) == (str(tensor.dtype).removeprefix("torch."), list(tensor.shape))
            assert data == raw(tensor), name
    group.close()


# ---- the recording HTTP double ------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The recording double in its own process; yields its base URL."""
    proc, base = sglang_receiver.spawn_server(cwd=ROOT)
    try:
        yield base
    finally:
        proc.kill()
        proc.wait(timeout=10)


def call(base: str, path: str, body: Any = None, method: str = "POST") -> tuple[int, Any]:
    """One request; returns the status and the decoded JSON (or text) reply."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
            return reply.status, _decode(reply.read(), reply.headers.get_content_type())
    except urllib.error.HTTPError as e:
        return e.code, _decode(e.read(), e.headers.get_content_type())


def _decode(data: bytes, kind: str) -> Any:
    return json.loads(data) if kind == "application/json" else data.decode()


def recorded_paths(base: str) -> list[str]:
    return [r["path"] for r in call(base, "/_recorded", method="GET")[1]]


def test_the_double_validates_bodies_like_fastapi(server):
    assert call(server, "/health", method="GET")[0] == 200
    before = recorded_paths(server)
    bad = {"master_address": "127.0.0.1", "master_port": "not a port", "rank_offset": 1}
    status, reply = call(server, "/init_weights_update_group", bad)
    assert status == 422
    locs = {tuple(err["loc"][-1:]) for err in reply["detail"]}
    assert ("master_port",) in locs and ("world_size",) in locs
    assert call(server, "/pause_generation", {"mode": "sideways"})[0] == 422
    assert call(server, "/pause_generation")[0] == 422  # FastAPI: the body is required
    assert recorded_paths(server) == before  # invalid calls are not recorded


def test_the_double_answers_the_control_endpoints_as_sglang_does(server):
    before = len(recorded_paths(server))
    assert call(server, "/pause_generation", {"mode": "retract"}) == (
        200,
        {"message": "Generation paused successfully.", "status": "ok"},
    )
    assert call(server, "/flush_cache", {})[0] == 200
    assert call(server, "/release_memory_occupation", {"tags": ["weights"]}) == (200, None)
    assert call(server, "/resume_memory_occupation", {}) == (200, None)
    status, reply = call(server, "/update_weights_from_tensor", {"serialized_named_tensors": []})
    assert (status, reply["success"]) == (400, False)  # SGLang 0.5.23: only inside a session
    assert call(server, "/update_weight_version", {"new_version": "v9"})[1]["new_version"] == "v9"
    assert call(server, "/model_info", method="GET")[1]["weight_version"] == "v9"
    assert call(server, "/continue_generation", {})[0] == 200
    assert call(server, "/get_weight_version", method="GET")[0] == 404  # not an SGLang route
    assert recorded_paths(server)[before:] == [
        "/pause_generation",
        "/flush_cache",
        "/release_memory_occupation",
        "/resume_memory_occupation",
        "/update_weights_from_tensor",
        "/update_weight_version",
        "/continue_generation",
    ]


def test_a_broadcast_over_http_reaches_sglang_and_our_own_receiver(server):
    """Mixed group: trainer (0), the double's SGLang updater (1), our WeightReceiver (2)."""
    tensors = weights()
    plan = plan_of(tensors)
    info = group_info(world_size=3, name="sluice_http_test")
    ours = {name: torch.zeros_like(t) for name, t in tensors.items()}
    with ThreadPoolExecutor(max_workers=3) as pool:
        trainer = pool.submit(init_weights_update_group, info, 0)
        mine = pool.submit(init_weights_update_group, info, 2)
        assert call(server, "/init_weights_update_group", join_fields(info, 1)) == (
            200,
            {"success": True, "message": "Succeeded to initialize custom process group."},
        )
        sender = WeightSender(trainer.result(timeout=TIMEOUT_S))
        receiver = WeightReceiver(mine.result(timeout=TIMEOUT_S), ours)

        status, reply = call(server, "/update_weights_from_distributed", update_body(info, plan[0]))
        assert (status, reply["success"]) == (400, False)  # no session: no broadcast joined
        assert call(server, "/begin_weight_update", {})[0] == 200

        sent = pool.submit(sender.send, plan, tensors.items(), 4)
        got = pool.submit(receiver.receive, plan, 4)
        for i, bucket in enumerate(plan):
            version = "4" if i == len(plan) - 1 else None
            status, reply = call(
                server, "/update_weights_from_distributed", update_body(info, bucket, version)
            )
            assert (status, reply["success"]) == (200, True), reply
        assert reply["message"].endswith("Weight version updated to 4.")
        assert sent.result(timeout=TIMEOUT_S).buckets == len(plan)
        assert got.result(timeout=TIMEOUT_S).version == 4
        assert call(server, "/end_weight_update", {})[0] == 200

    hashes = {name: hashlib.sha256(raw(t)).hexdigest() for name, t in tensors.items()}
    assert call(server, "/_received", method="GET")[1] == hashes
    assert all(raw(ours[name]) == raw(t) for name, t in tensors.items())
    assert call(server, "/model_info", method="GET")[1]["weight_version"] == "4"
    tail = recorded_paths(server)[-(len(plan) + 4) :]
    assert tail == [
        "/init_weights_update_group",
        "/update_weights_from_distributed",
        "/begin_weight_update",
        *["/update_weights_from_distributed"] * len(plan),
        "/end_weight_update",
    ]
    destroyed = call(server, "/destroy_weights_update_group", {"group_name": info.group_name})
    assert destroyed == (
        200,
        {"success": True, "message": "Succeeded to destroy custom process group."},
    )
    sender.group.close()
    receiver.group.close()
