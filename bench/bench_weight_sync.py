"""Weight sync speed: our bucketed path against one raw broadcast of the same bytes.

One Ray actor (the trainer, rank 0) sends a model's parameters to one or more engine actors
through `weights.sync`; in the same group and run, a raw broadcast of one flat tensor of the same
total size gives the floor. Each timing is the slowest member's, measured after an untimed
all-reduce that lines the members up; the median of `--repeats` runs is printed.

    uv run python -m bench.bench_weight_sync                      # CPU, gloo
    uv run python -m bench.bench_weight_sync --device cuda        # one GPU per actor, NCCL
"""

import argparse
import os
import statistics
import time
from dataclasses import dataclass

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # workers use this venv as is

import ray
import torch
import transformers

from models.tiny import tiny_config
from weights.checksum import compare_checksums, tensor_checksums
from weights.manifest import Bucket, manifest_of, plan_buckets
from weights.process_group import (
    BroadcastGroup,
    GroupInfo,
    init_weights_update_group,
    pick_master_address_and_port,
)
from weights.sync import WeightReceiver, WeightSender


def model_config(name: str) -> transformers.PretrainedConfig:
    """`tiny`: the built-in model (Qwen3-MoE, 0.15M params); `100m`, `1b`: Qwen3 dense models."""
    if name == "tiny":
        return tiny_config()
    if name == "100m":
        return transformers.Qwen3Config(
            vocab_size=32000,
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=8,
            num_attention_heads=12,
            num_key_value_heads=4,
            head_dim=64,
            tie_word_embeddings=False,
        )
    if name == "1b":
        return transformers.Qwen3Config(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown model {name!r}; choose tiny, 100m or 1b")


@dataclass(frozen=True)
class Timing:
    """One member's view of one transfer."""

    seconds: float
    nbytes: int


@ray.remote
class Member:
    """A trainer (rank 0) or an engine: holds a model and one end of the weight group."""

    def __init__(self, model: str, dtype: str, device: str, seed: int):
        if device == "cuda":
            torch.cuda.set_device(0)  # Ray shows each actor only its own GPU
        torch.manual_seed(seed)
        config = model_config(model)
        with torch.device(device):
            self.model = transformers.AutoModelForCausalLM.from_config(config)
        self.model.to(getattr(torch, dtype))
        self.device = device
        self._flat: torch.Tensor | None = None  # the raw broadcast's buffer, reused

    def open_group(self, world_size: int, backend: str) -> GroupInfo:
        address, port = pick_master_address_and_port()
        self.info = GroupInfo(address, port, world_size, backend=backend, timeout_s=300)
        return self.info

    def join(self, info: GroupInfo, rank: int) -> None:
        self.group: BroadcastGroup = init_weights_update_group(info, rank)

    def plan(self, bucket_bytes: int) -> list[Bucket]:
        return plan_buckets(manifest_of(self.model.named_parameters()), bucket_bytes)

    def sync(self, plan: list[Bucket], version: int) -> Timing:
        self._line_up()
        if self.group.rank == 0:
            stats = WeightSender(self.group).send(plan, self.model.named_parameters(), version)
        else:
            receiver = WeightReceiver(self.group, dict(self.model.named_parameters()))
            stats = receiver.receive(plan, version)
        return Timing(stats.seconds, stats.nbytes)

    def raw(self, nbytes: int) -> Timing:
        """One broadcast of `nbytes` as a single flat tensor, allocated and touched once."""
        if self._flat is None or self._flat.numel() != nbytes:
            self._flat = torch.zeros(nbytes, dtype=torch.uint8, device=self.group.device)
        flat = self._flat
        self._line_up()
        start = time.perf_counter()
        self.group.broadcast(flat)
        if flat.is_cuda:
            torch.cuda.synchronize()
        return Timing(time.perf_counter() - start, nbytes)

    def checksums(self) -> tuple[dict[str, str], float]:
        start = time.perf_counter()
        sums = tensor_checksums(self.model.named_parameters())
        if self.device == "cuda":
            torch.cuda.synchronize()
        return sums, time.perf_counter() - start

    def _line_up(self) -> None:
        self.group.all_reduce_sum(torch.zeros(1, device=self.group.device))
        if self.group.device.type == "cuda":
            torch.cuda.synchronize()


def slowest(refs: list[ray.ObjectRef]) -> Timing:
    timings = ray.get(refs)
    return max(timings, key=lambda t: t.seconds)


def bench(args: argparse.Namespace, model: str, engines: int) -> dict[str, object]:
    """Start 1 + `engines` actors, join them, time ours and raw `repeats` times each."""
    gpu = 1 if args.device == "cuda" else 0
    members = [
        Member.options(num_gpus=gpu, num_cpus=0).remote(model, args.dtype, args.device, seed=rank)
        for rank in range(1 + engines)
    ]
    backend = "nccl" if args.device == "cuda" else "gloo"
    info = ray.get(members[0].open_group.remote(1 + engines, backend))
    ray.get([m.join.remote(info, rank) for rank, m in enumerate(members)])
    plan = ray.get(members[0].plan.remote(args.bucket_mb << 20))
    nbytes = sum(b.nbytes for b in plan)
    ours, raw = [], []
    for version in range(args.repeats + 1):  # the first round warms up and is not counted
        o = slowest([m.sync.remote(plan, version) for m in members])
        r = slowest([m.raw.remote(nbytes) for m in members])
        if version:
            ours.append(o.seconds)
            raw.append(r.seconds)
    sums = ray.get([m.checksums.remote() for m in members])
    for other, _ in sums[1:]:
        compare_checksums(sums[0][0], other, where="engine")
    for m in members:
        ray.kill(m)
    ours_s, raw_s = statistics.median(ours), statistics.median(raw)
    return {
        "model": model,
        "params_M": nbytes / getattr(torch, args.dtype).itemsize / 1e6,
        "MB": nbytes / 1e6,
        "engines": engines,
        "buckets": len(plan),
        "ours_s": ours_s,
        "raw_s": raw_s,
        "ours_GB/s": nbytes / ours_s / 1e9,
        "raw_GB/s": nbytes / raw_s / 1e9,
        "ours/raw": ours_s / raw_s,
        "checksum_s": max(s for _, s in sums),
    }


def print_table(rows: list[dict[str, object]]) -> None:
    keys = list(rows[0])
    cells = [[_fmt(row[k]) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--models", nargs="+", default=["tiny", "100m"])
    parser.add_argument("--engines", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--bucket-mb", type=int, default=64, help="weight_sync.bucket_size_mb")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), num_gpus=gpus)
    device = torch.cuda.get_device_name(0) if gpus else f"CPU x{os.cpu_count()}"
    print(f"weight sync, {args.device} ({device}), {args.dtype}, bucket {args.bucket_mb} MiB")
    rows = [
        bench(args, model, engines)
        for model in args.models
        for engines in args.engines
        if args.device == "cpu" or engines + 1 <= gpus
    ]
    print_table(rows)
    ray.shutdown()


if __name__ == "__main__":
    main()
