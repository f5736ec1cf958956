"""Megatron backend speed on a Qwen3-MoE of about 1B parameters: steps, MFU, memory, export.

One torchrun world measures, in this order:
1. the matrix rate of each card: a bf16 GEMM of 8192^3 timed with CUDA events (on a machine
   without CUDA, an fp32 GEMM of 512^3), in TFLOP/s;
2. for each parallel layout (`tp2-sp`, `ep2`, `dp2-cpuadam`, `tp1-ep1-pack-rcfull`, ...): a
   fresh `MegatronBackend` over the same random-weight checkpoint (written once by rank 0),
   warm-up steps, then timed optimizer steps of one fixed synthetic batch (by default 64 rows x
   1024 tokens, responses about half of each row, `train.max_tokens_per_micro_batch` 16384),
   giving seconds per step, tokens/s, MFU, peak GPU memory and host RSS per rank;
3. the weight export of that layout: iterating `backend.weight_stream()` to the end (the
   gathers alone); the same export packed into the sync's 64 MiB buckets
   (`weights.sync.packed_buckets`) against one device-to-device copy of as many bytes
   (`pack/copy`, 1.0 = as fast as the copy); with 2+ ranks, the export sent by the trainer's
   `WeightSender` from rank 0 to rank 1 (what a weight sync to one engine costs), and, as the
   floor, one raw broadcast of the same number of bytes as a single tensor between the same
   two ranks. `sync/raw` and `export/raw` are time ratios against that floor (1.0 = as fast
   as raw);
4. with `--logprob-memory`: the memory-safe log-probs (`training.token_stats`) of one row of
   the longest length (`--max-len`) against the full vocabulary of Qwen3 (151,936; `--tiny`:
   the toy's), forward and backward from bf16 hidden states of the model's width (fp32 on the
   CPU), chunked (`train.log_prob_chunk_tokens`' default, 1024) and unchunked (0: one chunk,
   the whole [tokens, vocabulary] fp32 logits at once): peak GPU memory above the inputs,
   seconds, and the largest difference between the two's log-probs.

Layout parts: tpN, ppN, epN, dpN (a check of the data-parallel size), sp (sequence
parallelism), cpuadam (CPU Adam), overlap (with cpuadam: its host step overlapped with the
next forward, `train.overlap_cpu_adam_with_forward`), local (megatron-core's local spec), pack
(`train.pack_sequences`: rows packed without padding), rcfull / rcfullN (full activation
recompute, uniform, N layers a chunk, 1 by default: slime's `--recompute-granularity full
--recompute-method uniform --recompute-num-layers 1`), rcblockN (full, block, the first N
layers), rcsel (selective recompute, core attention).

Row lengths (`--lengths`): `fixed`, every row `--seq` tokens; or `longtail`, RL's long-tailed
response lengths: a seeded lognormal draw (sigma 1) clipped to [`--min-len`, `--max-len`], the
longest row set to `--max-len`, its location chosen (by bisection) so the clipped lengths
average `--mean-len` (defaults 256 rows, mean 2048, at most 8192, at least 64 tokens). The
profile is the same in every run of the same arguments; its mean, percentiles and maximum are
printed and written to the JSON.

Each timing is the slowest rank's, taken after an all-reduce that lines the ranks up; step and
export timings are medians over the timed repetitions. Each rank gets its share of the host's
cores as torch threads (torchrun sets one), which CPU Adam runs on. A layout that fails (an
invalid layout, out of memory) is recorded with its error and the next one runs; a failure on
one rank inside a collective can still hang the others until the process-group timeout.

Model FLOPs of a step (forward + backward), the usual 6N count plus attention, summed over
the step's rows r of S_r tokens (prompt + response) each:
    sum_r S_r x (6 x N_active + 12 x L x (heads x head_dim) x S_r)
so with varied lengths each row's attention term counts its own length (what packing
computes), never the padded width. N_active is the matrix weights one token goes through:
every 2-D checkpoint tensor except the input embedding (the output layer is counted), expert
weights scaled by top_k / num_experts. L is the number of layers; the attention term counts
QK^T and AV without halving for the causal mask. Only the rows' real tokens count: `tok/s`
and MFU are of real tokens, `computed tok/s` counts what the model ran on (padding to each
micro-batch's longest row included; packed, each row less its last token, which predicts
nothing). MFU = step FLOPs / step seconds / world size / the measured matrix rate (mean over
ranks). `act_GiB`: the steps' peak GPU memory less what was allocated before them (weights,
gradients, optimizer state), i.e. activations and temporaries.

Run on GPUs (NCCL; world size = number of processes; layouts default to tpW-sp, epW,
dpW-cpuadam for W processes):
    torchrun --nproc-per-node 2 bench/bench_megatron.py --out DIR \
        [--layouts tp2-sp,ep2,dp2-cpuadam] [--steps N]
Issue 30's long rows on one GPU (padded against packed on the long-tailed profile, recompute,
log-prob memory, then CPU Adam at 64 and 512 rows of 1024 tokens), from the repository root of
the GPU machine carrying .gpu (bench/pack_sglang_run.sh), in one command:
    OUT=DIR bench/run_gpu_sglang.sh long
which runs, in the SGLang bundle's environment (`gpu_env_sglang`: megatron-core included):
    python3 -m torch.distributed.run --standalone --nproc-per-node 1 bench/bench_megatron.py \
        --model topology --layers 2 --lengths longtail --rows 256 --logprob-memory \
        --layouts tp1-ep1,tp1-ep1-pack,tp1-ep1-pack-rcfull,tp1-ep1-pack-rcsel --out DIR/long
and `--layouts tp1-ep1,tp1-ep1-cpuadam --rows 64` and `--rows 512` (`--micro-tokens 32768`).
Smoke test without a GPU (gloo, toy model, float32; CPU Adam layouts run in bf16):
    PYTHONPATH=tests/megatron/site:. python -m torch.distributed.run --nproc-per-node 2 \
        bench/bench_megatron.py --out /tmp/out --tiny [--lengths longtail --logprob-memory \
        --layouts dp2,dp2-pack-rcfull,dp2-rcsel]
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

from config.schema import ParallelConfig, SluiceConfig, TrainConfig
from data.schema import build_rollout_batch
from models.checkpoint_format import checkpoint_tensors
from models.safetensors_io import write_sharded
from training.backend import TrainStats
from training.batch import pack_by_token_budget, rows_of, split_by_token_budget
from weights.manifest import plan_buckets
from weights.runs import TensorRun

SEED = 7
GIB = 1 << 30
LAYOUT_PARTS = (
    "tpN, ppN, epN, dpN (a check: N = world / (tp x pp)), sp, cpuadam, overlap, local, pack, "
    "rcfull[N], rcblockN, rcsel"
)
LENGTH_SIGMA = 1.0
"""Spread of the long-tailed profile's lognormal draw (of log-lengths)."""
QWEN3_VOCAB = 151936
"""Qwen3's vocabulary, of the log-prob memory measurement (the topology model's is cut)."""
MARKER = "bench_config.json"  # config of the random checkpoint, to reuse it when unchanged


@dataclass(frozen=True)
class Sizes:
    """The model, batch and repetitions of one run (`--tiny` or the 1B defaults)."""

    tiny: bool
    rows: int
    """Rollout rows per optimizer step, all data-parallel ranks together."""
    seq: int
    """Tokens per row, prompt + response, with fixed lengths; the mean length otherwise."""
    lengths: tuple[int, ...]
    """Each row's tokens, prompt + response (`row_lengths`)."""
    profile: str
    """`fixed` or `longtail` (`--lengths`)."""
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
    longtail = args.lengths == "longtail"
    rows = args.rows or (16 if tiny else 256) if longtail else args.rows or (8 if tiny else 64)
    if longtail:
        lengths = long_tail_lengths(rows, args.mean_len, args.max_len, args.min_len)
    else:
        lengths = (args.seq or (64 if tiny else 1024),) * rows
    return Sizes(
        tiny=tiny,
        rows=rows,
        seq=round(float(np.mean(lengths))),
        lengths=lengths,
        profile=args.lengths,
        micro_tokens=args.micro_tokens or (256 if tiny else 16384),
        warmup=args.warmup if args.warmup is not None else (1 if tiny else 2),
        steps=args.steps or (2 if tiny else 5),
        export_repeats=args.export_repeats or (1 if tiny else 2),
        bucket_bytes=args.bucket_mb << 20,
        matrix_n=8192 if on_gpu else 512,
        model_dir=Path(args.model_dir or default_dir),
    )


def long_tail_lengths(rows: int, mean: int, longest: int, shortest: int) -> tuple[int, ...]:
    """`rows` lengths in [shortest, longest] averaging about `mean`: exp(mu + sigma z) of
    seeded standard normals z, clipped, the longest draw set to `longest` (so the profile
    always holds a row of the maximum length), mu found by bisection (the clipped mean grows
    with mu)."""
    z = np.random.default_rng(SEED).standard_normal(rows)
    top = int(np.argmax(z))

    def draw(mu: float) -> np.ndarray:
        lengths = np.clip(np.rint(np.exp(mu + LENGTH_SIGMA * z)), shortest, longest)
        lengths[top] = longest
        return lengths

    low, high = np.log(shortest) - 4 * LENGTH_SIGMA, np.log(longest) + 4 * LENGTH_SIGMA
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if draw(mid).mean() < mean else (low, mid)
    return tuple(int(n) for n in draw((low + high) / 2))


def length_summary(lengths: tuple[int, ...]) -> dict[str, float]:
    """The profile's size and shape: rows, total tokens, mean, percentiles, extremes."""
    a = np.asarray(lengths)
    summary = {"rows": len(a), "tokens": int(a.sum()), "mean": float(a.mean())}
    summary |= {"min": int(a.min()), "max": int(a.max())}
    for q in (50, 90, 99):
        summary[f"p{q}"] = float(np.percentile(a, q))
    return summary


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
    attention_flops: float
    """12 x L x heads x head_dim: a token's attention FLOPs per token of its row."""

    def flops_per_token(self, seq: float) -> float:
        """Forward + backward FLOPs of one token of a row of `seq` tokens."""
        return 6 * self.active_params + self.attention_flops * seq

    def step_flops(self, lengths: tuple[int, ...]) -> float:
        """Of rows of these lengths, each row's attention at its own length."""
        tokens = np.asarray(lengths, dtype=np.float64)
        return float(6 * self.active_params * tokens.sum() + self.attention_flops * tokens @ tokens)


def checkpoint_shapes(hf_config: Any) -> list[tuple[str, torch.Size]]:
    """Name and shape of every checkpoint tensor, from a model built on the meta device."""
    from transformers import Qwen3MoeForCausalLM

    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(hf_config)
    return [(name, tensor.shape) for name, tensor in checkpoint_tensors(model)]


def model_facts(hf_config: Any, shapes: list[tuple[str, torch.Size]]) -> ModelFacts:
    c = hf_config
    expert_share = c.num_experts_per_tok / c.num_experts
    total, active = 0, 0.0
    for name, shape in shapes:
        numel = shape.numel()
        total += numel
        if len(shape) == 2 and "embed_tokens" not in name:
            active += numel * (expert_share if ".experts." in name else 1.0)
    attention = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim
    return ModelFacts(total, active, float(attention))


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
    """`sizes.rows` rows of `sizes.lengths` tokens, the response 3/8 to 5/8 of each."""
    rng = np.random.default_rng(SEED)
    names = ("prompt_ids", "response_ids", "rollout_log_probs", "loss_mask")
    columns: dict[str, list] = {k: [] for k in names}
    lengths = np.asarray(sizes.lengths)
    # one draw of every prompt length first: fixed-length batches as before this option
    prompt_lens = rng.integers(lengths * 3 // 8, lengths * 5 // 8 + 1)
    for length, prompt_len in zip(lengths.tolist(), prompt_lens.tolist(), strict=True):
        ids = rng.integers(0, vocab_size, length)
        response_len = length - prompt_len
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

NO_RECOMPUTE = ("off", "uniform", 1)


@dataclass(frozen=True)
class Layout:
    name: str
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cpu_adam: bool = False
    overlap: bool = False
    """With cpu_adam: `train.overlap_cpu_adam_with_forward`."""
    layer_spec: str = "torch"
    """`local`: megatron-core's local spec (SequentialMLP, unfused attention), for comparison."""
    pack: bool = False
    """`train.pack_sequences`."""
    recompute: tuple[str, str, int] = NO_RECOMPUTE
    """`train.recompute_granularity`, `recompute_method`, `recompute_num_layers`."""


def parse_layout(name: str, world: int) -> Layout:
    """`tp2-sp`, `ep2`, `dp2-cpuadam`, `ep1-local`, `tp1-pack-rcfull`, ...; a wrong part or
    data-parallel size is an error."""
    p, cpu_adam, dp, layer_spec, pack = ParallelConfig(), False, None, "torch", False
    overlap = False
    recompute = NO_RECOMPUTE
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
        elif part == "overlap":
            overlap = True
        elif part == "local":
            layer_spec = "local"
        elif part == "pack":
            pack = True
        elif kind == "rcfull":
            recompute = ("full", "uniform", int(number or 1))
        elif kind == "rcblock" and number:
            recompute = ("full", "block", int(number))
        elif part == "rcsel":
            recompute = ("selective", "uniform", 1)
        else:
            raise ValueError(f"layout {name!r}: unknown part {part!r}; parts: {LAYOUT_PARTS}")
    if dp is not None and dp * p.tensor * p.pipeline != world:
        raise ValueError(
            f"layout {name!r}: dp{dp} x tp{p.tensor} x pp{p.pipeline} != world size {world}"
        )
    if overlap and not cpu_adam:
        raise ValueError(f"layout {name!r}: overlap is CPU Adam's; add cpuadam")
    return Layout(name, p, cpu_adam, overlap, layer_spec, pack, recompute)


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
    t.pack_sequences = layout.pack
    t.recompute_granularity, t.recompute_method, t.recompute_num_layers = layout.recompute
    if layout.cpu_adam:
        t.optimizer_cpu_offload = True
        t.overlap_cpu_optimizer_d2h_h2d = True
        t.use_precision_aware_optimizer = True
        t.overlap_cpu_adam_with_forward = layout.overlap
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


def computed_tokens(backend, batches, max_tokens: int) -> int:
    """Tokens the model runs on in a step, every data-parallel rank's micro-batches together:
    padded, each micro-batch's rows x its longest row; packed, each row but its last token
    (`training.batch`'s planning, as the backend's; without the padding micro-batches a rank
    with fewer runs, and sequence parallelism's rounding)."""
    pack = backend.config.train.pack_sequences
    total = 0
    for rank in range(backend.data_parallel_size):
        rows = rows_of(batches[rank :: backend.data_parallel_size])
        if pack:
            plan = pack_by_token_budget(rows, max_tokens)
            total += sum(rows.length(i) - 1 for group in plan for i in group)
        else:
            plan = split_by_token_budget(rows, max_tokens)
            total += sum(len(group) * max(rows.length(i) for i in group) for group in plan)
    return total


def measure_steps(backend, sizes: Sizes, batches, device, facts: ModelFacts) -> dict[str, Any]:
    share, normalizer = step_inputs(backend, batches)
    step = partial(backend.train, share, normalizer)
    seconds, losses = [], []
    memory: dict[str, Any] = {}
    for index in range(sizes.warmup + sizes.steps):
        if index == sizes.warmup:
            memory = step_memory_start(device)
        elapsed, stats = timed(device, step)
        losses.append(TrainStats.reduce(gathered(stats))["train/loss"])
        if index >= sizes.warmup:
            seconds.append(elapsed)
    step_s = statistics.median(seconds)
    tokens = sum(sizes.lengths)
    computed = computed_tokens(backend, batches, sizes.micro_tokens)
    return {
        "step_s": step_s,
        "step_s_all": seconds,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step_s,
        "computed_tokens_per_step": computed,
        "computed_tokens_per_s": computed / step_s,
        "model_tflops_per_gpu": facts.step_flops(sizes.lengths)
        / step_s
        / 1e12
        / dist.get_world_size(),
        "losses": losses,
    } | step_memory_end(device, memory)


def step_memory_start(device) -> dict[str, int]:
    """Before the timed steps (GPU): the peak so far (the build's and warm-up's) and what is
    allocated now (weights, gradients, optimizer state); the peak is then reset, so that
    `max_memory_allocated` reads the timed steps' own."""
    if device.type != "cuda":
        return {}
    before = {"peak": torch.cuda.max_memory_allocated(device)}
    before["static"] = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return before


def step_memory_end(device, before: dict[str, int]) -> dict[str, Any]:
    """Per rank, GiB: the build's and warm-up's peak, the timed steps' peak, what was
    allocated before them, and the steps' peak above that (`act_GiB`: activations and
    temporaries)."""
    if device.type != "cuda" or not before:
        return {}
    peak = torch.cuda.max_memory_allocated(device)
    return {
        "warmup_peak_GiB": gathered(before["peak"] / GIB),
        "step_peak_GiB": gathered(peak / GIB),
        "static_GiB": gathered(before["static"] / GIB),
        "act_GiB": gathered((peak - before["static"]) / GIB),
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
        if device.type == "cuda":  # the steps' peak was reset: the larger of it and before
            peak = torch.cuda.max_memory_allocated(device) / GIB
            before = result.get("warmup_peak_GiB", [0.0] * world)[dist.get_rank()]
            result["peak_gpu_GiB"] = gathered(max(peak, before))
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


# Log-prob memory.


def measure_log_prob_memory(
    device, tokens: int, hidden_size: int, vocab: int, chunks: tuple[int, ...]
) -> dict[str, Any]:
    """`training.token_stats` forward and backward (the sum of the log-probs) of one row of
    `tokens` tokens against a `vocab` output layer, at each chunk size (0: unchunked): peak
    GPU memory above the inputs (GiB; the pass's gradients included), seconds, and the
    largest log-prob difference against the first chunk size's."""
    from training.token_stats import token_stats

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device).manual_seed(SEED)
    hidden = torch.randn(tokens, hidden_size, generator=generator, device=device, dtype=dtype)
    weight = torch.randn(vocab, hidden_size, generator=generator, device=device, dtype=dtype)
    weight = (weight * 0.02).requires_grad_()
    hidden.requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=generator, device=device)
    out: dict[str, Any] = {"tokens": tokens, "hidden": hidden_size, "vocab": vocab}
    out["dtype"] = str(dtype).removeprefix("torch.")
    first = None
    for chunk in chunks:
        hidden.grad = weight.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

        def forward_backward(chunk=chunk):
            log_probs, _ = token_stats(hidden, weight, targets, 1.0, chunk)
            log_probs.sum().backward()
            return log_probs.detach()

        seconds, log_probs = timed(device, forward_backward)
        entry: dict[str, Any] = {"seconds": seconds}
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base
            entry["peak_GiB"] = max(gathered(peak / GIB))
        first = log_probs if first is None else first
        entry["max_abs_diff"] = (log_probs.float() - first.float()).abs().max().item()
        out[f"chunk_{chunk}"] = entry
    return out


# Report.


def table_row(name: str, r: dict[str, Any], matrix_flops: float) -> dict[str, Any]:
    row: dict[str, Any] = {"layout": name, "dtype": r.get("dtype", "")}
    if "step_s" in r:
        row |= {"step_s": r["step_s"], "tok/s": r["tokens_per_s"]}
        row["computed tok/s"] = r["computed_tokens_per_s"]
        row["MFU"] = r["model_tflops_per_gpu"] * 1e12 / matrix_flops
    if "peak_gpu_GiB" in r:
        row["gpu_GiB"] = max(r["peak_gpu_GiB"])
    if "act_GiB" in r:
        row["act_GiB"] = max(r["act_GiB"])
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


def _brief(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in values.items())


# Main.


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for megatron_bench.json")
    parser.add_argument("--layouts", help="comma-separated; default tpW-sp,epW,dpW-cpuadam")
    parser.add_argument("--steps", type=int, help="timed steps (default 5; --tiny 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2; --tiny 1)")
    parser.add_argument("--rows", type=int, help="rows per step (default 64; longtail 256)")
    parser.add_argument("--seq", type=int, help="tokens per row, fixed lengths (default 1024)")
    parser.add_argument(
        "--lengths",
        choices=("fixed", "longtail"),
        default="fixed",
        help="row lengths: all --seq, or long-tailed (lognormal, see the module docstring)",
    )
    parser.add_argument("--mean-len", type=int, help="longtail: mean tokens a row (2048)")
    parser.add_argument("--max-len", type=int, help="longtail: the longest row (8192)")
    parser.add_argument("--min-len", type=int, help="longtail: the shortest row (64)")
    parser.add_argument(
        "--logprob-memory",
        action="store_true",
        help="also measure chunked against unchunked log-prob memory at one longest row",
    )
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
    longtail_only = [k for k in ("mean_len", "max_len", "min_len") if getattr(args, k) is not None]
    if args.lengths == "fixed" and longtail_only:
        given = ", ".join("--" + k.replace("_", "-") for k in longtail_only)
        parser.error(f"{given}: only with --lengths longtail")
    if args.lengths == "longtail" and args.seq is not None:
        parser.error("--seq: only with --lengths fixed (longtail: --mean-len, --max-len)")
    length_defaults = (32, 128, 4) if args.tiny else (2048, 8192, 64)
    for key, default in zip(("mean_len", "max_len", "min_len"), length_defaults, strict=True):
        if getattr(args, key) is None:
            setattr(args, key, default)
    if not 4 <= args.min_len < args.mean_len < args.max_len:
        parser.error(
            f"--min-len {args.min_len}, --mean-len {args.mean_len}, --max-len {args.max_len}: "
            f"need 4 <= min < mean < max"
        )
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
    facts = model_facts(hf_config, shapes)
    start = time.perf_counter()
    wrote = write_checkpoint(hf_config, shapes, sizes.model_dir, device) if rank == 0 else None
    dist.all_reduce(torch.zeros(1, device=device))  # the checkpoint is complete
    say(
        f"checkpoint {sizes.model_dir}: {'written' if wrote else 'reused'} in "
        f"{time.perf_counter() - start:.1f} s; {facts.total_params / 1e6:.1f}M params, "
        f"{facts.active_params / 1e6:.1f}M active (matrix weights), "
        f"{facts.flops_per_token(sizes.seq) / 1e6:.1f} MFLOP/token at {sizes.seq} tokens a row",
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
            "flops_per_token": facts.flops_per_token(sizes.seq),
            "attention_flops_per_token_per_position": facts.attention_flops,
        },
        "batch": {
            "rows": sizes.rows,
            "seq": sizes.seq,
            "micro_tokens": sizes.micro_tokens,
            "lengths": sizes.profile,
            "length_summary": length_summary(sizes.lengths),
        },
        "steps": {"warmup": sizes.warmup, "timed": sizes.steps},
        "layouts": {},
    }
    say(f"row lengths ({sizes.profile}): {_brief(report['batch']['length_summary'])}")
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
    if args.logprob_memory:
        vocab = hf_config.vocab_size if sizes.tiny else QWEN3_VOCAB
        chunks = (TrainConfig().log_prob_chunk_tokens if not sizes.tiny else 16, 0)
        memory = measure_log_prob_memory(
            device, max(sizes.lengths), hf_config.hidden_size, vocab, chunks
        )
        report["log_prob_memory"] = memory
        if rank == 0:
            out.write_text(json.dumps(report, indent=1) + "\n")
        say(f"log-prob memory (0: unchunked): {memory}", flush=True)
    shape = f"{sizes.rows} rows x {sizes.seq} tokens"
    if sizes.profile == "longtail":
        shape = f"{sizes.rows} rows, {sum(sizes.lengths)} tokens (mean {sizes.seq})"
    say(f"\nmegatron backend, {world} x {name}, {shape} a step")
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
