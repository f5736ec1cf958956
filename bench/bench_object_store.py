"""Rollout batches through the Ray object store, against a plain memory copy of the same bytes.

A producer actor builds one Arrow record batch of `ROLLOUT_SCHEMA` (about `--target-mb` MB, rows
of `--response-len` response tokens) and times `ray.put`; a consumer actor times `ray.get` of
the reference and then touches the rows (sums every response token through the zero-copy view
`data.schema.ragged`). The baseline, timed in the same run on the same bytes, is a plain
memory copy of every Arrow buffer of the batch: `np.copy` (into fresh memory, as `ray.put`
writes into a fresh object) and `np.copyto` into buffers allocated and touched beforehand (the
machine's copy bandwidth). Medians over `--repeats` rounds after one warm-up round.
`--routing LAYERSxTOPK` adds routing replay's `routed_experts` column (one uint8 id per fed
position, MoE layer and top-k slot; Qwen3-30B-A3B is 48x8), whose bytes then dominate the batch.

    uv run python -m bench.bench_object_store
    uv run python -m bench.bench_object_store --target-mb 200 --repeats 7
    uv run python -m bench.bench_object_store --routing 48x8
"""

import argparse
import os
import statistics
import time
from dataclasses import dataclass

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # workers use this venv as is

import numpy as np
import pyarrow as pa
import ray

from data.schema import ROLLOUT_SCHEMA, check_schema, ragged

BYTES_PER_TOKEN = 4 + 4 + 1
"""response_ids (int32) + rollout_log_probs (float32) + loss_mask (int8)."""
BYTES_PER_ROW = 4 * 4 + 4 + 4 + 8 + 4 + 8 + 4 + 4
"""Four list offsets, the scalar columns, and finish_reason's offset plus its 4 characters."""


def rows_for(target_mb: float, prompt_len: int, response_len: int, routing: int = 0) -> int:
    """Rows that make a batch of about `target_mb` MB (10^6 bytes); `routing` expert ids per
    fed position (layers x top_k, 0 without routing replay)."""
    row = BYTES_PER_ROW + 4 * prompt_len + BYTES_PER_TOKEN * response_len
    row += (4 + routing * (prompt_len + response_len - 1)) if routing else 0
    return max(1, int(target_mb * 1e6 / row))


def list_column(values: np.ndarray, rows: int, width: int, kind: pa.DataType) -> pa.Array:
    """A list<kind> array of `rows` rows of `width` items each, over `values` (no copy)."""
    offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values, type=kind))


def build_batch(
    rows: int, prompt_len: int, response_len: int, seed: int, routing: int = 0
) -> pa.RecordBatch:
    """A `ROLLOUT_SCHEMA` batch of random rows, built from numpy arrays (no Python rows)."""
    rng = np.random.default_rng(seed)
    tokens = rows * response_len
    finish = np.where(rng.random(rows) < 0.5, "stop", "leng")  # 4 characters either way
    columns = {
        "prompt_ids": list_column(
            rng.integers(0, 150_000, rows * prompt_len, dtype=np.int32),
            rows,
            prompt_len,
            pa.int32(),
        ),
        "response_ids": list_column(
            rng.integers(0, 150_000, tokens, dtype=np.int32), rows, response_len, pa.int32()
        ),
        "rollout_log_probs": list_column(
            -rng.random(tokens, dtype=np.float32), rows, response_len, pa.float32()
        ),
        "loss_mask": list_column(np.ones(tokens, dtype=np.int8), rows, response_len, pa.int8()),
        "turn_starts": list_column(np.zeros(rows, dtype=np.int32), rows, 1, pa.int32()),
        "reward": pa.array(rng.random(rows, dtype=np.float32)),
        "advantage": pa.array(rng.standard_normal(rows, dtype=np.float32)),
        "group_id": pa.array(np.arange(rows, dtype=np.int64) // 8),
        "sample_index": pa.array(np.arange(rows, dtype=np.int32) % 8),
        "weight_version": pa.array(np.zeros(rows, dtype=np.int64)),
        "finish_reason": pa.array(finish.tolist(), type=pa.string()),
        "routed_experts": pa.nulls(rows, pa.list_(pa.uint8())),
    }
    if routing:
        width = routing * (prompt_len + response_len - 1)
        ids = rng.integers(0, 128, rows * width, dtype=np.uint8)
        columns["routed_experts"] = list_column(ids, rows, width, pa.uint8())
    batch = pa.RecordBatch.from_arrays(
        [columns[f.name] for f in ROLLOUT_SCHEMA], schema=ROLLOUT_SCHEMA
    )
    check_schema(batch)
    return batch


def buffers_of(batch: pa.RecordBatch) -> list[np.ndarray]:
    """Every Arrow buffer of the batch (children included) as a uint8 view."""
    out = []
    for column in batch.columns:
        # buffers() walks the children too (a list's values); absent validity bitmaps are None
        out += [np.frombuffer(b, dtype=np.uint8) for b in column.buffers() if b is not None]
    return out


def response_token_sum(batch: pa.RecordBatch) -> int:
    """What a trainer does first with its rows: read every response token (zero-copy view)."""
    return int(ragged(batch, "response_ids").values.sum(dtype=np.int64))


@dataclass(frozen=True)
class PutTiming:
    put_s: float
    copy_s: float
    """np.copy of every buffer (fresh destination)."""
    copy_prealloc_s: float
    """np.copyto into destinations allocated and touched before the clock."""
    sum_s: float
    """The consumer's touch (sum of response_ids), on the producer's private memory."""
    nbytes: int


@ray.remote(num_cpus=0)
class Producer:
    """Holds one batch; puts it into the object store and copies its buffers, both timed."""

    def __init__(self, rows: int, prompt_len: int, response_len: int, seed: int, routing: int):
        self.batch = build_batch(rows, prompt_len, response_len, seed, routing)
        self.buffers = buffers_of(self.batch)
        self.targets = [np.ones_like(b) for b in self.buffers]  # touched: pages are mapped

    def describe(self) -> tuple[int, int, int]:
        """Rows, bytes of all buffers, and the expected response-token sum."""
        nbytes = sum(b.nbytes for b in self.buffers)
        return self.batch.num_rows, nbytes, response_token_sum(self.batch)

    def put(self) -> tuple[list[ray.ObjectRef], PutTiming]:
        """Time `ray.put`, then the two copies. The ref goes back inside a list (not resolved)."""
        start = time.perf_counter()
        ref = ray.put(self.batch)
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        copies = [b.copy() for b in self.buffers]
        copy_s = time.perf_counter() - start
        start = time.perf_counter()
        for dst, src in zip(self.targets, self.buffers, strict=True):
            np.copyto(dst, src)
        prealloc_s = time.perf_counter() - start
        start = time.perf_counter()
        response_token_sum(self.batch)
        sum_s = time.perf_counter() - start
        nbytes = sum(c.nbytes for c in copies)
        del copies
        return [ref], PutTiming(put_s, copy_s, prealloc_s, sum_s, nbytes)


@dataclass(frozen=True)
class GetTiming:
    get_s: float
    touch_s: float
    """Sum of every response token, read from the object store's shared memory."""
    total: int
    zero_copy: bool
    """Whether the batch's buffers live in the object store (not in this process's heap)."""


@ray.remote(num_cpus=0)
class Consumer:
    """Gets a batch by reference and reads its rows, as a TrainActor does."""

    def get(self, boxed: list[ray.ObjectRef]) -> GetTiming:
        start = time.perf_counter()
        batch = ray.get(boxed[0])
        get_s = time.perf_counter() - start
        start = time.perf_counter()
        total = response_token_sum(batch)
        touch_s = time.perf_counter() - start
        zero_copy = not batch.column("response_ids").values.buffers()[1].is_mutable
        return GetTiming(get_s, touch_s, total, zero_copy)


def run_rounds(
    producer, consumer, repeats: int, expected: int
) -> list[tuple[PutTiming, GetTiming]]:
    """One warm-up round, then `repeats` timed ones; each round puts a fresh object."""
    rounds = []
    for i in range(repeats + 1):
        boxed, put = ray.get(producer.put.remote())
        got = ray.get(consumer.get.remote(boxed))
        if got.total != expected:
            raise RuntimeError(f"consumer summed {got.total}, expected {expected}")
        del boxed  # the object is freed before the next round
        if i:
            rounds.append((put, got))
    return rounds


def report(rounds: list[tuple[PutTiming, GetTiming]], nbytes: int) -> None:
    """Medians in ms, bandwidths in GB/s and the ratios to the plain copy."""

    def med(values) -> float:
        return statistics.median(values)

    put = med(p.put_s for p, _ in rounds)
    copy = med(p.copy_s for p, _ in rounds)
    prealloc = med(p.copy_prealloc_s for p, _ in rounds)
    get = med(g.get_s for _, g in rounds)
    touch = med(g.touch_s for _, g in rounds)
    local_sum = med(p.sum_s for p, _ in rounds)
    rows = [
        ("memcpy (np.copy, fresh memory)", copy),
        ("memcpy (np.copyto, preallocated)", prealloc),
        ("ray.put (producer actor)", put),
        ("ray.get (consumer actor)", get),
        ("touch: sum response_ids after get", touch),
        ("same sum on private memory", local_sum),
        ("ray.get + touch", get + touch),
    ]
    print(f"{'what':36} {'ms':>9} {'GB/s':>8}")
    for name, seconds in rows:
        print(f"{name:36} {seconds * 1e3:9.2f} {nbytes / seconds / 1e9:8.2f}")
    print(f"ratio put / memcpy          {put / copy:8.3f}  (vs preallocated {put / prealloc:.3f})")
    print(f"ratio get / memcpy          {get / copy:8.4f}  (vs preallocated {get / prealloc:.4f})")
    print(f"ratio get+touch / memcpy    {(get + touch) / copy:8.3f}")
    print(f"zero-copy get in every round: {all(g.zero_copy for _, g in rounds)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-mb", type=float, default=200.0, help="batch size, 10^6 bytes")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--response-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--object-store-gb", type=float, default=1.5)
    parser.add_argument(
        "--routing", default="", help="LAYERSxTOPK: add a routed_experts column (e.g. 48x8)"
    )
    args = parser.parse_args()
    routing = 0
    if args.routing:
        layers, top_k = (int(n) for n in args.routing.lower().split("x"))
        routing = layers * top_k
    ray.init(
        address="local",
        num_cpus=max(2, os.cpu_count() or 2),
        object_store_memory=int(args.object_store_gb * 1e9),
        include_dashboard=False,
        logging_level="WARNING",
    )
    rows = rows_for(args.target_mb, args.prompt_len, args.response_len, routing)
    producer = Producer.remote(rows, args.prompt_len, args.response_len, 0, routing)
    consumer = Consumer.remote()
    rows, nbytes, expected = ray.get(producer.describe.remote())
    print(
        f"object store: {rows} rows x ({args.prompt_len} prompt + {args.response_len} response "
        f"tokens), {nbytes / 1e6:.1f} MB, CPU x{os.cpu_count()}, median of {args.repeats}"
    )
    if routing:
        per_token = routing + BYTES_PER_TOKEN
        print(
            f"routed_experts: {routing} ids ({args.routing}) = {routing} bytes per token, "
            f"{routing / per_token:.0%} of the batch's per-token bytes"
        )
    report(run_rounds(producer, consumer, args.repeats, expected), nbytes)
    ray.shutdown()


if __name__ == "__main__":
    main()
