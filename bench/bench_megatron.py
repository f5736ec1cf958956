"""Megatron backend speed on a Qwen3-MoE of about 1B parameters: steps, MFU, memory, export.

One torchrun world measures, in this order:
1. the matrix rate of each card: a bf16 GEMM of 8192^3 timed with CUDA events (on a machine
   without CUDA, an fp32 GEMM of 512^3), in TFLOP/s;
2. for each parallel layout (`tp2-sp`, `ep2`, `dp2-cpuadam`, ...): a fresh `MegatronBackend`
   over the same random-weight checkpoint (written once by rank 0), warm-up steps, then timed
   optimizer steps of one fixed synthetic batch (64 rows x 1024 tokens, responses about half
   of each row, `train.max_tokens_per_micro_batch` 16384), giving seconds per step, tokens/s,
   MFU, peak GPU memory and host RSS per rank;
3. the weight export of that layout: iterating `backend.weight_stream()` to the end (the
   gathers alone); the same export packed into the sync's 64 MiB buckets
   (`weights.sync.packed_buckets`) against one device-to-device copy of as many bytes
   (`pack/copy`, 1.0 = as fast as the copy); with 2+ ranks, the export sent by the trainer's
   `WeightSender` from rank 0 to rank 1 (what a weight sync to one engine costs), and, as the
   floor, one raw broadcast of the same number of bytes as a single tensor between the same
   two ranks. `sync/raw` and `export/raw` are time ratios against that floor (1.0 = as fast
   as raw).

Each timing is the slowest rank's, taken after an all-reduce that lines the ranks up; step and
export timings are medians over the timed repetitions. Each rank gets its share of the host's
cores as torch threads (torchrun sets one), which CPU Adam runs on. A layout that fails (an
invalid layout, out of memory) is recorded with its error and the next one runs; a failure on
one rank inside a collective can still hang the others until the process-group timeout.

Model FLOPs per token (forward + backward), the usual 6N count plus attention:
    6 x N_active + 12 x L x (heads x head_dim) x S
N_active is the matrix weights one token goes through: every 2-D checkpoint tensor except the
input embedding (the output layer is counted), expert weights scaled by top_k / num_experts.
L is the number of layers and S the row length (prompt + response); the attention term counts
QK^T and AV without halving for the causal mask. Tokens are all tokens of the step's rows.
MFU = tokens/s x FLOPs per token / world size / the measured matrix rate (mean over ranks).

Run on GPUs (NCCL; world size = number of processes; layouts default to tpW-sp, epW,
dpW-cpuadam for W processes):
    torchrun --nproc-per-node 2 bench/bench_megatron.py --out DIR \
        [--layouts tp2-sp,ep2,dp2-cpuadam] [--steps N]
Smoke test without a GPU (gloo, toy model, float32; CPU Adam layouts run in bf16):
    PYTHONPATH=tests/megatron/site:. python -m torch.distributed.run --nproc-per-node 2 \
        bench/bench_megatron.py --out /tmp/out --tiny
Writes DIR/megatron_bench.json on rank 0 (rewritten after every layout) and prints a table.
"""

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config.schema import ParallelConfig, SluiceConfig
from data.schema import build_rollout_batch
from models.checkpoint_format import checkpoint_tensors
from models.safetensors_io import write_sharded
from training.backend import TrainStats
from weights.manifest import plan_buckets
from weights.runs import TensorRun

SEED = 7
GIB = 1 << 30
LAYOUT_PARTS = "tpN, ppN, epN, dpN (a check: N = world / (tp x pp)), sp, cpuadam, local"
MARKER = "bench_config.json"  # config of the random checkpoint, to reuse it when unchanged


@dataclass(frozen=True)
class Sizes:
    """The model, batch and repetitions of one run (`--tiny` or the 1B defaults)."""

    tiny: bool
    rows: int
    """Rollout rows per optimizer step, all data-parallel ranks together."""
    seq: int
    """Tokens per row, prompt + response."""
    micro_tokens: int
    """`train.max_tokens_per_micro_batch`."""
    warmup: int
    steps: int
    export_repeats: int
    bucket_bytes: int
    matrix_n: int
    model_dir: Path


def resolve_sizes(args: argparse.Namespace, on_gpu: bool) -> Sizes:
    tiny = args.tiny
    model = "tiny" if tiny else args.model if args.model == "1b" else f"topo{args.layers}"
    default_dir = f"/tmp/sluice_bench_qwen3moe_{model}"
    return Sizes(
        tiny=tiny,
        rows=args.rows or (8 if tiny else 64),
        seq=args.seq or (64 if tiny else 1024),
        micro_tokens=args.micro_tokens or (256 if tiny else 16384),
        warmup=args.warmup if args.warmup is not None else (1 if tiny else 2),
        steps=args.steps or (2 if tiny else 5),
        export_repeats=args.export_repeats or (1 if tiny else 2),
        bucket_bytes=args.bucket_mb << 20,
        matrix_n=8192 if on_gpu else 512,
        model_dir=Path(args.model_dir or default_dir),
    )


def model_config(tiny: bool, model: str = "1b", layers: int = 8) -> Any:
    """Qwen3-MoE, 16 layers, 32 experts top-4: about 1.0B parameters, 0.19B active per token;
    or (`model="topology"`) Qwen3-30B-A3B's widths at `layers` layers (bench/topology.py)."""
    from transformers import Qwen3MoeConfig

    if model == "topology" and not tiny:
        from bench.topology import topology_config

        return topology_config(layers)
    if tiny:
        shape = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32)
        shape |= dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        shape |= dict(head_dim=16, num_experts=4, num_experts_per_tok=2, vocab_size=256)
        shape |= dict(max_position_embeddings=256)
    else:
        shape = dict(hidden_size=1024, intermediate_size=3072, moe_intermediate_size=576)
        shape |= dict(num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4)
        shape |= dict(head_dim=64, num_experts=32, num_experts_per_tok=4, vocab_size=32000)
        shape |= dict(max_position_embeddings=4096)
    return Qwen3MoeConfig(**shape, tie_word_embeddings=False, norm_topk_prob=True)


@dataclass(frozen=True)
class ModelFacts:
    total_params: int
    active_params: float
    """Matrix weights one token goes through (see the module docstring)."""
    flops_per_token: float


def checkpoint_shapes(hf_config: Any) -> list[tuple[str, torch.Size]]:
    """Name and shape of every checkpoint tensor, from a model built on the meta device."""
    from transformers import Qwen3MoeForCausalLM

    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(hf_config)
    return [(name, tensor.shape) for name, tensor in checkpoint_tensors(model)]


def model_facts(hf_config: Any, shapes: list[tuple[str, torch.Size]], seq: int) -> ModelFacts:
    c = hf_config
    expert_share = c.num_experts_per_tok / c.num_experts
    total, active = 0, 0.0
    for name, shape in shapes:
        numel = shape.numel()
        total += numel
        if len(shape) == 2 and "embed_tokens" not in name:
            active += numel * (expert_share if ".experts." in name else 1.0)
    attention = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq
    return ModelFacts(total, active, 6 * active + attention)


def write_checkpoint(hf_config: Any, shapes, directory: Path, device: torch.device) -> bool:
    """Random bf16 weights (norms 1, the rest N(0, 0.02)) as a Hugging Face directory.

    Kept when the directory already holds this config; returns whether it wrote one."""
    wanted = hf_config.to_json_string()
    marker = directory / MARKER
    if marker.is_file() and marker.read_text() == wanted:
        return False
    torch.manual_seed(SEED)

    def tensors():
        for name, shape in shapes:
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape, dtype=torch.bfloat16)
            else:
                weight = torch.randn(shape, device=device) * 0.02
                yield name, weight.to(torch.bfloat16).cpu()

    with tempfile.TemporaryDirectory() as staging:
        hf_config.save_pretrained(staging)
        (Path(staging) / MARKER).write_text(wanted)
        extra = [Path(staging) / "config.json", Path(staging) / MARKER]
        write_sharded(directory, tensors(), extra_files=extra)
    return True


def rollout_batches(sizes: Sizes, vocab_size: int) -> list[pa.RecordBatch]:
    """`sizes.rows` rows of exactly `sizes.seq` tokens, the response 3/8 to 5/8 of each."""
    rng = np.random.default_rng(SEED)
    names = ("prompt_ids", "response_ids", "rollout_log_probs", "loss_mask")
    columns: dict[str, list] = {k: [] for k in names}
    for prompt_len in rng.integers(sizes.seq * 3 // 8, sizes.seq * 5 // 8 + 1, sizes.rows):
        ids = rng.integers(0, vocab_size, sizes.seq)
        response_len = sizes.seq - int(prompt_len)
        columns["prompt_ids"].append(ids[:prompt_len].tolist())
        columns["response_ids"].append(ids[prompt_len:].tolist())
        columns["rollout_log_probs"].append((-rng.random(response_len) * 3).tolist())
        columns["loss_mask"].append([1] * response_len)
    columns["reward"] = rng.random(sizes.rows).tolist()
    columns["advantage"] = (rng.random(sizes.rows) - 0.5).tolist()
    columns["group_id"] = list(range(sizes.rows))
    columns["sample_index"] = [0] * sizes.rows
    columns["weight_version"] = [0] * sizes.rows
    columns["finish_reason"] = ["stop"] * sizes.rows
    batch = build_rollout_batch(columns)
    per_batch = max(1, sizes.rows // 8)
    return [batch.slice(i, per_batch) for i in range(0, sizes.rows, per_batch)]


# Layouts.


@dataclass(frozen=True)
class Layout:
    name: str
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cpu_adam: bool = False
    layer_spec: str = "torch"
    """`local`: megatron-core's local spec (SequentialMLP, unfused attention), for comparison."""


def parse_layout(name: str, world: int) -> Layout:
    """`tp2-sp`, `ep2`, `dp2-cpuadam`, `ep1-local`, ...; a wrong part or data-parallel size is
    an error."""
    p, cpu_adam, dp, layer_spec = ParallelConfig(), False, None, "torch"
    sizes = {"tp": "tensor", "pp": "pipeline", "ep": "expert"}
    for part in name.split("-"):
        kind = part.rstrip("0123456789")
        number = part[len(kind) :]
        if kind in sizes and number:
            setattr(p, sizes[kind], int(number))
        elif kind == "dp" and number:
            dp = int(number)
        elif part == "sp":
            p.sequence = True
        elif part == "cpuadam":
            cpu_adam = True
        elif part == "local":
            layer_spec = "local"
        else:
            raise ValueError(f"layout {name!r}: unknown part {part!r}; parts: {LAYOUT_PARTS}")
    if dp is not None and dp * p.tensor * p.pipeline != world:
        raise ValueError(
            f"layout {name!r}: dp{dp} x tp{p.tensor} x pp{p.pipeline} != world size {world}"
        )
    return Layout(name, p, cpu_adam, layer_spec)


def default_layouts(world: int) -> list[str]:
    if world == 1:
        return ["dp1", "dp1-cpuadam"]
    return [f"tp{world}-sp", f"ep{world}", f"dp{world}-cpuadam"]


def sluice_config(layout: Layout, world: int, sizes: Sizes, on_gpu: bool) -> SluiceConfig:
    config = SluiceConfig(seed=SEED)
    config.model.hf_checkpoint = str(sizes.model_dir)
    # CPU Adam needs bf16 parameters (megatron-core 0.19.2), also on the CPU.
    config.model.dtype = "bfloat16" if on_gpu or layout.cpu_adam else "float32"
    t = config.train
    t.backend = "megatron"
    t.num_workers = world
    t.max_tokens_per_micro_batch = sizes.micro_tokens
    t.parallel = layout.parallel
    t.layer_spec = layout.layer_spec
    if layout.cpu_adam:
        t.optimizer_cpu_offload = True
        t.overlap_cpu_optimizer_d2h_h2d = True
        t.use_precision_aware_optimizer = True
    return config


# Timing.


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def slowest(seconds: float, device: torch.device) -> float:
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    """(the slowest rank's seconds, fn's result), after an all-reduce lines the ranks up."""
    dist.all_reduce(torch.zeros(1, device=device))
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return slowest(time.perf_counter() - start, device), result


def repeated(device: torch.device, fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of `repeats` timed calls after one untimed warm-up call."""
    fn()
    runs = [timed(device, fn) for _ in range(repeats)]
    return statistics.median(s for s, _ in runs), runs[-1][1]


def matrix_rate(device: torch.device, n: int) -> float:
    """FLOP/s of an n^3 matrix product: bf16 with CUDA events on a GPU, fp32 on the CPU."""
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty_like(a)
    iterations = 50 if on_gpu else 5
    for _ in range(3):
        torch.mm(a, b, out=out)
    sync(device)
    if on_gpu:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            torch.mm(a, b, out=out)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        begin = time.perf_counter()
        for _ in range(iterations):
            torch.mm(a, b, out=out)
        seconds = time.perf_counter() - begin
    return 2 * n**3 * iterations / seconds


# Memory.


def host_memory_gib() -> dict[str, float]:
    """Resident set now and its peak since the last `reset_host_peak` (Linux /proc)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024 / GIB
    return {"rss": fields.get("VmRSS", float("nan")), "peak": fields.get("VmHWM", float("nan"))}


def reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM


def gathered(value: Any) -> list[Any]:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


# One layout.


@dataclass(frozen=True)
class Pair:
    """Global ranks 0 (the sender) and 1 (one receiver) in a group of their own."""

    group: Any
    member: bool
    sender: bool
    backend: str
    """`nccl` or `gloo`, the world's."""


def step_inputs(backend, batches) -> tuple[list, float]:
    """This rank's rows of the step and the step's global loss-token count (`train`'s args)."""
    share = batches[backend.data_parallel_rank :: backend.data_parallel_size]
    normalizer = float(sum(b.column("loss_mask").flatten().to_numpy().sum() for b in batches))
    return share, normalizer


def measure_steps(backend, sizes: Sizes, batches, device, facts: ModelFacts) -> dict[str, Any]:
    share, normalizer = step_inputs(backend, batches)
    step = partial(backend.train, share, normalizer)
    seconds, losses = [], []
    for index in range(sizes.warmup + sizes.steps):
        elapsed, stats = timed(device, step)
        losses.append(TrainStats.reduce(gathered(stats))["train/loss"])
        if index >= sizes.warmup:
            seconds.append(elapsed)
    step_s = statistics.median(seconds)
    tokens = sizes.rows * sizes.seq
    return {
        "step_s": step_s,
        "step_s_all": seconds,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step_s,
        "model_tflops_per_gpu": tokens
        * facts.flops_per_token
        / step_s
        / 1e12
        / dist.get_world_size(),
        "losses": losses,
    }


def export_and_broadcast(backend, pair: Pair, plan, device) -> None:
    """The weight sync to one engine: rank 0 sends the export with the trainer's own
    `WeightSender` (runs, double-buffered buckets); rank 1 packs the same buckets from its own
    copy of the full tensors and receives into them, so both walk the gathers in step."""
    from weights.process_group import BroadcastGroup, GroupInfo
    from weights.sync import WeightSender, packed_buckets

    stream = backend.weight_stream()
    if pair.sender:
        info = GroupInfo("bench", 0, 2, backend=pair.backend, checked=False)
        WeightSender(BroadcastGroup(info, 0, None, pair.group)).send(plan, stream, version=0)
    elif pair.member:
        for packed in packed_buckets(plan, stream, device):
            dist.broadcast(packed, src=0, group=pair.group)
    else:
        for _ in stream:  # take part in the gathers
            pass


def measure_export(backend, sizes: Sizes, pair: Pair | None, device) -> dict[str, Any]:
    def gather_only() -> int:
        return sum(item_bytes(item) for item in backend.weight_stream())

    export_s, nbytes = repeated(device, gather_only, sizes.export_repeats)
    out: dict[str, Any] = {"export_GB": nbytes / 1e9, "export_s": export_s}
    out["export_GB/s"] = nbytes / export_s / 1e9
    plan = plan_buckets(backend.weight_specs(), sizes.bucket_bytes)
    out |= measure_packing(backend, plan, sizes, device, nbytes)
    if pair is None:  # one rank: nobody to send to
        return out
    send = partial(export_and_broadcast, backend, pair, plan, device)
    sync_s, _ = repeated(device, send, sizes.export_repeats)
    flat = torch.empty(nbytes, dtype=torch.uint8, device=device) if pair.member else None

    def raw() -> None:
        if pair.member:
            dist.broadcast(flat, src=0, group=pair.group)

    raw_s, _ = repeated(device, raw, sizes.export_repeats)
    out |= {"sync_s": sync_s, "raw_s": raw_s}
    out |= {"sync_GB/s": nbytes / sync_s / 1e9, "raw_GB/s": nbytes / raw_s / 1e9}
    out |= {"sync/raw": sync_s / raw_s, "export/raw": export_s / raw_s}
    return out


def item_bytes(item: Any) -> int:
    tensor = item.stacked if isinstance(item, TensorRun) else item[1]
    return tensor.numel() * tensor.element_size()


def measure_packing(backend, plan, sizes: Sizes, device, nbytes: int) -> dict[str, Any]:
    """The export packed into the weight sync's buckets (`weights.sync.packed_buckets`, what
    the sender does before each broadcast) against one device-to-device copy of as many bytes:
    `pack/copy` is the packing's share of the copy's rate (1.0 = as fast as a plain copy)."""
    from weights.sync import IN_FLIGHT, packed_buckets

    def pack() -> None:
        for _ in packed_buckets(plan, backend.weight_stream(), device, IN_FLIGHT):
            pass

    pack_s, _ = repeated(device, pack, sizes.export_repeats)
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_s, _ = repeated(device, partial(target.copy_, source), sizes.export_repeats)
    del source, target
    return {
        "pack_s": pack_s,
        "copy_s": copy_s,
        "pack_GB/s": nbytes / pack_s / 1e9,
        "copy_GB/s": nbytes / copy_s / 1e9,
        "pack/copy": copy_s / pack_s,
    }


def profile_step(backend, sizes: Sizes, batches, device, path: Path) -> None:
    """One optimizer step under torch's profiler; the ops by device time (on a GPU) and by
    host time go to `path` (rank 0)."""
    from torch.profiler import ProfilerActivity, profile

    share, normalizer = step_inputs(backend, batches)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        backend.train(share, normalizer)
        sync(device)
    if dist.get_rank() == 0:
        sorts = ["self_cpu_time_total"]
        if device.type == "cuda":
            sorts.insert(0, "self_cuda_time_total")
        averages = prof.key_averages()
        tables = [
            f"sorted by {sort}:\n"
            + averages.table(sort_by=sort, row_limit=40, max_name_column_width=70)
            for sort in sorts
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(tables))
        print(tables[0][:6000], flush=True)


def run_layout(
    layout: Layout, sizes: Sizes, batches, facts, pair, device, profile_dir: Path | None = None
) -> dict[str, Any]:
    """Build, train, measure and tear down one layout; errors are returned, not raised."""
    from megatron.core import parallel_state

    from training.megatron.backend import MegatronBackend

    world = dist.get_world_size()
    config = sluice_config(layout, world, sizes, device.type == "cuda")
    result: dict[str, Any] = {"dtype": config.model.dtype}
    error = None
    backend = None
    reset_peaks(device)
    try:
        result["build_s"], backend = timed(device, partial(MegatronBackend, config, device))
        result |= measure_steps(backend, sizes, batches, device, facts)
        if profile_dir is not None:
            path = profile_dir / f"profile_{layout.name}.txt"
            profile_step(backend, sizes, batches, device, path)
        if device.type == "cuda":
            result["peak_gpu_GiB"] = gathered(torch.cuda.max_memory_allocated(device) / GIB)
        host = gathered(host_memory_gib())
        result["host_rss_GiB"] = [h["rss"] for h in host]
        result["host_peak_GiB"] = [h["peak"] for h in host]
        result |= measure_export(backend, sizes, pair, device)
    except Exception as exc:  # recorded; the next layout runs
        error = f"{type(exc).__name__}: {exc}"[:2000]
    backend = None
    parallel_state.destroy_model_parallel()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    errors = gathered(error)
    if any(errors):
        result["error"] = "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e)
    return result


# Report.


def table_row(name: str, r: dict[str, Any], matrix_flops: float) -> dict[str, Any]:
    row: dict[str, Any] = {"layout": name, "dtype": r.get("dtype", "")}
    if "step_s" in r:
        row |= {"step_s": r["step_s"], "tok/s": r["tokens_per_s"]}
        row["MFU"] = r["model_tflops_per_gpu"] * 1e12 / matrix_flops
    if "peak_gpu_GiB" in r:
        row["gpu_GiB"] = max(r["peak_gpu_GiB"])
    if "host_rss_GiB" in r:
        row["rss_GiB"] = max(r["host_rss_GiB"])
    for key in (
        "export_GB",
        "export_GB/s",
        "pack/copy",
        "sync_GB/s",
        "raw_GB/s",
        "sync/raw",
        "export/raw",
    ):
        if key in r:
            row[key] = r[key]
    row["error"] = "yes" if "error" in r else ""
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k != "error"]
    keys.append("error")
    cells = [[_fmt(row.get(k, "-")) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# Main.


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for megatron_bench.json")
    parser.add_argument("--layouts", help="comma-separated; default tpW-sp,epW,dpW-cpuadam")
    parser.add_argument("--steps", type=int, help="timed steps (default 5; --tiny 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2; --tiny 1)")
    parser.add_argument("--rows", type=int, help="rows per step (default 64)")
    parser.add_argument("--seq", type=int, help="tokens per row (default 1024)")
    parser.add_argument("--micro-tokens", type=int, help="max tokens per micro-batch (16384)")
    parser.add_argument("--export-repeats", type=int, help="timed exports (default 2)")
    parser.add_argument("--bucket-mb", type=int, default=64, help="broadcast bucket, MiB")
    parser.add_argument("--model-dir", help="where the random checkpoint is written (rank 0)")
    parser.add_argument("--tiny", action="store_true", help="toy model and batch: a smoke test")
    parser.add_argument(
        "--model",
        choices=("1b", "topology"),
        default="1b",
        help="1b: 16 layers, 32 experts; topology: Qwen3-30B-A3B's widths (bench/topology.py)",
    )
    parser.add_argument("--layers", type=int, default=8, help="layers of --model topology")
    parser.add_argument(
        "--profile",
        default="",
        help="comma-separated layouts to profile one step of (writes profile_LAYOUT.txt)",
    )
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    names = args.layouts.split(",") if args.layouts else default_layouts(world)
    try:
        args.parsed_layouts = [parse_layout(n, world) for n in names]
    except ValueError as exc:
        parser.error(str(exc))
    return args


def start_world() -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def main() -> None:
    args = parse_args()
    device = start_world()
    on_gpu = device.type == "cuda"
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))  # CPU Adam's share
    sizes = resolve_sizes(args, on_gpu)
    pair = None
    if world > 1:
        group = dist.new_group([0, 1])
        pair = Pair(group, rank < 2, rank == 0, dist.get_backend())
    say = print if rank == 0 else (lambda *a, **k: None)

    hf_config = model_config(sizes.tiny, args.model, args.layers)
    shapes = checkpoint_shapes(hf_config)
    facts = model_facts(hf_config, shapes, sizes.seq)
    start = time.perf_counter()
    wrote = write_checkpoint(hf_config, shapes, sizes.model_dir, device) if rank == 0 else None
    dist.all_reduce(torch.zeros(1, device=device))  # the checkpoint is complete
    say(
        f"checkpoint {sizes.model_dir}: {'written' if wrote else 'reused'} in "
        f"{time.perf_counter() - start:.1f} s; {facts.total_params / 1e6:.1f}M params, "
        f"{facts.active_params / 1e6:.1f}M active (matrix weights), "
        f"{facts.flops_per_token / 1e6:.1f} MFLOP/token",
        flush=True,
    )

    rates = gathered(matrix_rate(device, sizes.matrix_n))
    matrix_flops = statistics.mean(rates)
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU x{os.cpu_count()}"
    say(f"{world} x {name}: matrix {matrix_flops / 1e12:.1f} TFLOP/s per rank", flush=True)

    import megatron.core

    report: dict[str, Any] = {
        "device": name,
        "world_size": world,
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "cpu_threads_per_rank": torch.get_num_threads(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if on_gpu else None,
        "matrix": {"n": sizes.matrix_n, "dtype": "bfloat16" if on_gpu else "float32"},
        "matrix_tflops_per_rank": [r / 1e12 for r in rates],
        "model": {
            "config": {k: getattr(hf_config, k) for k in _SHAPE_KEYS},
            "total_params": facts.total_params,
            "active_params": facts.active_params,
            "flops_per_token": facts.flops_per_token,
        },
        "batch": {"rows": sizes.rows, "seq": sizes.seq, "micro_tokens": sizes.micro_tokens},
        "steps": {"warmup": sizes.warmup, "timed": sizes.steps},
        "layouts": {},
    }
    out = Path(args.out) / "megatron_bench.json"
    batches = rollout_batches(sizes, hf_config.vocab_size)
    rows = []
    for layout in args.parsed_layouts:
        profile_dir = Path(args.out) if layout.name in args.profile.split(",") else None
        result = run_layout(layout, sizes, batches, facts, pair, device, profile_dir)
        report["layouts"][layout.name] = result
        rows.append(table_row(layout.name, result, matrix_flops))
        if rank == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
        brief = {k: _fmt(v) for k, v in rows[-1].items() if k != "layout"}
        say(f"{layout.name}: {brief}", flush=True)
    say(f"\nmegatron backend, {world} x {name}, {sizes.rows} rows x {sizes.seq} tokens a step")
    if rank == 0:
        print_table(rows)
        for layout_name, result in report["layouts"].items():
            if "error" in result:
                print(f"{layout_name} failed: {result['error']}")
        print(f"wrote {out}")
    dist.destroy_process_group()


_SHAPE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "vocab_size",
)


if __name__ == "__main__":
    main()
