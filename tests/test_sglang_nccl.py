"""Our trainer broadcasts over NCCL to an engine that joins and receives as SGLang does (2 GPUs).

`tests/test_sglang_weight_group.py` runs SGLang's own `WeightUpdater` against our group, but on
the CPU with gloo. SGLang cannot be installed on the GPU machine (sglang 0.5.23 pins a newer
torch), so here the engine side is a spawned process on GPU 1 that makes the torch calls SGLang
makes, written out below: `join_like_sglang` (its `init_custom_process_group`) and
`receive_flat_bucket` (its flattened-bucket receive). What this adds to the gloo test is NCCL:
the backend store prefix torch adds for NCCL (`cuda/`, not `cpu/`) and NCCL's connection at the
first collective. The trainer is this process on GPU 0 with our code only:
`init_weights_update_group(GroupInfo(..., backend="nccl", checked=False), rank=0)` and
`WeightSender.send`. The engine hashes what it received; the hashes must equal the sender's.

Then it times a sync of about 1 GB (our bucketed send, the engine receiving SGLang's way)
against one raw broadcast of the same number of bytes in the same group; `pytest -s` shows it.
"""

import datetime
import hashlib
import math
import multiprocessing as mp
import socket
import statistics
import time
import traceback
from multiprocessing.queues import Queue
from typing import Any

import pytest
import torch
import torch.distributed as dist

from weights.manifest import Bucket, manifest_of, plan_buckets
from weights.process_group import GroupInfo, init_weights_update_group
from weights.sync import WeightSender

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.sglang,
    pytest.mark.skipif(
        torch.cuda.device_count() < 2,
        reason=f"needs 2 CUDA GPUs (trainer on GPU 0, engine on GPU 1); "
        f"found {torch.cuda.device_count()}",
    ),
]

TRAINER_GPU, ENGINE_GPU = 0, 1
TIMEOUT_S = 120.0
"""Joining and each collective; covers the engine's start (CUDA and imports, some seconds)."""

GROUP_NAME = "sluice_sglang_nccl_test"
BUCKET_BYTES = 32 << 20
"""Correctness run: about 200 MB in buckets of 32 MiB."""

BENCH_BUCKET_BYTES = 256 << 20
BENCH_REPEATS = 3

BucketFields = tuple[list[str], list[str], list[list[int]]]
"""One bucket as SGLang's `/update_weights_from_distributed` names it: names, dtypes, shapes."""


# ---- the engine side: SGLang's torch calls, no sglang import ---------------------------------


def join_like_sglang(
    master_address: str,
    master_port: int,
    world_size: int,
    rank: int,
    group_name: str,
    backend: str = "nccl",
    timeout: datetime.timedelta | None = None,
) -> dist.ProcessGroup:
    """Join a weight-update group with the torch calls SGLang makes.

    Mirrors sglang 0.5.23's `init_custom_process_group` (`sglang/srt/utils/common.py`) as its
    `WeightUpdater.init_weights_update_group` calls it (`init_method="tcp://address:port"`, no
    store, no options, no device id): rendezvous at the address, wrap the store in
    `PrefixStore(group_name, ...)`, build the group with torch's private
    `_new_process_group_helper` (empty rank list), and register an identity rank map so that
    `torch.distributed.broadcast(src=0, group=pg)` can translate ranks. SGLang's own function is
    shown to meet our group in `tests/test_sglang_weight_group.py` (gloo, on the CPU); this
    copy lets the same join run where sglang cannot be installed. SGLang passes no timeout
    (torch's default, 30 minutes); tests pass a shorter one.
    """
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        default_pg_timeout,
        rendezvous,
    )

    timeout = default_pg_timeout if timeout is None else timeout
    url = f"tcp://{master_address}:{master_port}"
    store, rank, world_size = next(rendezvous(url, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        PrefixStore(group_name, store),
        group_name=group_name,
        backend_options=None,
        timeout=timeout,
        device_id=None,
    )
    _world.pg_group_ranks[pg] = {r: r for r in range(world_size)}
    return pg


def receive_flat_bucket(
    pg: dist.ProcessGroup, fields: BucketFields, device: torch.device
) -> list[tuple[str, torch.Tensor]]:
    """One bucket received as SGLang's `load_format="flattened_bucket"` does it.

    Like `FlattenedTensorBucket.empty` + `reconstruct_tensors` in sglang 0.5.23: one flat uint8
    buffer holding the tensors back to back with no padding (a tensor whose byte offset its
    dtype's size does not divide is refused), one `torch.distributed.broadcast` from rank 0,
    then each tensor a view of its byte range.
    """
    names, dtypes, shapes = fields
    layout, offset = [], 0
    for name, dtype_name, shape in zip(names, dtypes, shapes, strict=True):
        dtype = getattr(torch, dtype_name)
        if offset % dtype.itemsize:
            raise ValueError(f"unaligned tensor {name}: byte offset {offset}, dtype {dtype}")
        nbytes = math.prod(shape) * dtype.itemsize
        layout.append((name, dtype, shape, offset, nbytes))
        offset += nbytes
    flat = torch.empty(offset, dtype=torch.uint8, device=device)
    dist.broadcast(flat, src=0, group=pg)
    return [
        (name, flat[start : start + nbytes].view(dtype).reshape(shape))
        for name, dtype, shape, start, nbytes in layout
    ]


def engine(
    results: Queue,
    join: dict[str, Any],
    buckets: list[BucketFields],
    bench_buckets: list[BucketFields],
    bench_nbytes: int,
) -> None:
    """The spawned engine rank on GPU 1: join, receive `buckets` and report each tensor's
    sha256, then take part in the timed rounds. Messages: `("hashes", {name: hex})`,
    `("ready", None)` right before each timed transfer, `("done", None)`; `("error", text)`
    instead on any failure."""
    try:
        torch.cuda.set_device(ENGINE_GPU)
        device = torch.device("cuda", ENGINE_GPU)
        # SGLang's WeightUpdater asserts a default group exists (its TP group); one of 1 rank.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        pg = join_like_sglang(**join)

        hashes = {}
        for fields in buckets:
            for name, tensor in receive_flat_bucket(pg, fields, device):
                hashes[name] = sha256_of(tensor)
        results.put(("hashes", hashes))

        raw = torch.empty(bench_nbytes, dtype=torch.uint8, device=device)
        for _ in range(BENCH_REPEATS):
            results.put(("ready", None))
            for fields in bench_buckets:
                receive_flat_bucket(pg, fields, device)
            torch.cuda.synchronize(device)
            results.put(("ready", None))
            dist.broadcast(raw, src=0, group=pg)
            torch.cuda.synchronize(device)
        results.put(("done", None))
        dist.destroy_process_group(pg)  # SGLang's /destroy_weights_update_group
        dist.destroy_process_group()
    except Exception:  # the parent reports it; a traceback here would be lost
        results.put(("error", traceback.format_exc()))


def sha256_of(tensor: torch.Tensor) -> str:
    """Hex sha256 of the tensor's bytes (row-major), wherever it lives."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


# ---- the trainer side: our code -----------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _random(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    device = torch.device("cuda", TRAINER_GPU)
    return torch.randn(shape, generator=g, device=device).to(dtype)


def weights() -> dict[str, torch.Tensor]:
    """About 200 MB of bf16 and fp32 tensors of odd sizes, on GPU 0.

    The 15013 x 1023 bf16 embedding has an odd element count, so an fp32 tensor after it would
    start misaligned and opens a new bucket; each fp32 up-projection (about 49 MB) is larger
    than a bucket and goes in place; the rest share buckets with other dtypes.
    """
    g = torch.Generator(device=torch.device("cuda", TRAINER_GPU)).manual_seed(11)
    bf16, fp32 = torch.bfloat16, torch.float32
    out = {"model.embed_tokens.weight": _random((15013, 1023), bf16, g)}
    for i in range(2):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = _random((1023,), bf16, g)
        out[p + "self_attn.q_proj.weight"] = _random((2047, 1024), bf16, g)
        out[p + "self_attn.q_proj.bias"] = _random((2047,), fp32, g)
        out[p + "mlp.up_proj.weight"] = _random((4099, 3001), fp32, g)
        out[p + "mlp.down_proj.weight"] = _random((3001, 4099), bf16, g)
        out[p + "post_attention_layernorm.weight"] = _random((4099,), fp32, g)
    out["model.norm.weight"] = _random((1,), bf16, g)
    out["lm_head.weight"] = _random((1023, 5003), fp32, g)
    out["logit_scale"] = _random((), fp32, g)
    return out


def bench_weights() -> dict[str, torch.Tensor]:
    """About 1 GB: 34 bf16 matrices of 3584 x 4099 (29.4 MB each), 9 to a 256 MiB bucket."""
    g = torch.Generator(device=torch.device("cuda", TRAINER_GPU)).manual_seed(12)
    return {f"w{i}": _random((3584, 4099), torch.bfloat16, g) for i in range(34)}


def fields_of(plan: list[Bucket]) -> list[BucketFields]:
    return [(b.names, b.dtypes, b.shapes) for b in plan]


def expect(results: Queue, kind: str) -> Any:
    """The engine's next message, which must be `kind`; its error fails the test."""
    got, payload = results.get(timeout=TIMEOUT_S)
    if got == "error":
        pytest.fail(f"the engine failed:\n{payload}")
    assert got == kind, (got, payload)
    return payload


def test_an_sglang_style_nccl_engine_receives_our_broadcast_bit_for_bit():
    torch.cuda.set_device(TRAINER_GPU)
    tensors = weights()
    plan = plan_buckets(manifest_of(tensors.items()), BUCKET_BYTES)
    assert len(plan) >= 4
    assert any(len(b.specs) > 1 for b in plan) and any(b.nbytes > BUCKET_BYTES for b in plan)
    assert {s.dtype for b in plan for s in b.specs} == {"bfloat16", "float32"}
    bench = bench_weights()
    bench_plan = plan_buckets(manifest_of(bench.items()), BENCH_BUCKET_BYTES)
    bench_nbytes = sum(b.nbytes for b in bench_plan)
    raw = torch.empty(bench_nbytes, dtype=torch.uint8, device=torch.device("cuda", TRAINER_GPU))

    info = GroupInfo(
        "127.0.0.1",
        free_port(),
        world_size=2,
        group_name=GROUP_NAME,
        backend="nccl",
        timeout_s=TIMEOUT_S,
        checked=False,
    )
    group = init_weights_update_group(info, rank=0)  # hosts the store; NCCL connects later
    join = {
        "master_address": info.master_address,
        "master_port": info.master_port,
        "world_size": 2,
        "rank": 1,
        "group_name": info.group_name,
        "backend": "nccl",
        "timeout": datetime.timedelta(seconds=TIMEOUT_S),
    }
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(
        target=engine,
        args=(results, join, fields_of(plan), fields_of(bench_plan), bench_nbytes),
        daemon=True,
    )
    proc.start()
    try:
        stats = WeightSender(group).send(plan, tensors.items(), version=1)
        received = expect(results, "hashes")
        sent = {name: sha256_of(t) for name, t in tensors.items()}
        assert stats.buckets == len(plan)
        assert stats.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
        assert received.keys() == sent.keys()
        assert [n for n in sent if received[n] != sent[n]] == []
        print(
            f"\ncorrectness: {len(sent)} tensors, {stats.nbytes / 1e6:.1f} MB in "
            f"{stats.buckets} buckets over NCCL: all sha256 equal"
        )

        ours, plain = [], []
        for round_ in range(BENCH_REPEATS):
            expect(results, "ready")
            torch.cuda.synchronize()
            ours.append(WeightSender(group).send(bench_plan, bench.items(), 2 + round_).seconds)
            expect(results, "ready")
            torch.cuda.synchronize()
            start = time.perf_counter()
            group.broadcast(raw)
            torch.cuda.synchronize()
            plain.append(time.perf_counter() - start)
        expect(results, "done")
        group.close()  # while the engine destroys its end: NCCL's shutdown waits for both
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0

    def rate(seconds: list[float]) -> str:
        best, median = min(seconds), statistics.median(seconds)
        gb_per_s = bench_nbytes / best / 1e9
        return f"best {best * 1e3:.1f} ms ({gb_per_s:.0f} GB/s), median {median * 1e3:.1f} ms"

    print(
        f"bandwidth, {bench_nbytes / 1e9:.3f} GB, {len(bench_plan)} buckets of <= 256 MiB, "
        f"{BENCH_REPEATS} rounds:\n"
        f"  WeightSender.send -> SGLang-style receive: {rate(ours)}\n"
        f"  one raw broadcast of the same bytes, same group: {rate(plain)}"
    )
