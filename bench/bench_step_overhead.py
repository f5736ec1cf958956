"""Framework overhead of one synchronous RL step, against the step's own compute.

Builds the real `Driver` for a recipe (default: recipes/tiny.yaml), runs `--warmup` untimed
steps, then `--steps` measured ones, and splits each step's wall time (`time/step`) into:

- generation compute: `rollout/generate_seconds` (the slowest engine's `generate` call);
- training compute: `train/compute_seconds` (the slowest rank's forward/backward/step);
- overhead = step - generation - training: Ray dispatch, prompt encoding, rewards and
  advantages, Arrow batches into and out of the object store, balancing, and the weight sync;
  the sync (`time/sync`) is also shown on its own, and the rest as "overhead w/o sync".

Medians (and means) over the measured steps are printed, absolute and as a share of the step.

    uv run python -m bench.bench_step_overhead
    uv run python -m bench.bench_step_overhead --steps 20 --warmup 2 --set rollout.num_engines=1
    uv run python -m bench.bench_step_overhead --from-metrics outputs/tiny/metrics.jsonl
"""

import argparse
import json
import os
import statistics
import tempfile

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # workers use this venv as is

import ray

from config.loader import load_config
from driver import Driver

DEFAULT_RECIPE = "recipes/tiny.yaml"

PARTS = {
    "step": lambda m: m["time/step"],
    "generation": lambda m: m["rollout/generate_seconds"],
    "training": lambda m: m["train/compute_seconds"],
    "overhead": lambda m: overhead(m),
    "  of which sync": lambda m: m["time/sync"],
    "  of which rollout path": lambda m: m["time/rollout"] - m["rollout/generate_seconds"],
    "  of which train path": lambda m: m["time/train"] - m["train/compute_seconds"],
}
"""Per-step figures, from one step's metrics. time/step = time/rollout + time/train + time/sync
exactly, so the three `of which` lines add up to the overhead."""


def overhead(metrics: dict[str, float]) -> float:
    """Step wall time not spent in generation or training compute."""
    return (
        metrics["time/step"]
        - metrics["rollout/generate_seconds"]
        - metrics["train/compute_seconds"]
    )


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """`section.key=value` strings -> load_config overrides."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected section.key=value")
        overrides[key] = value
    return overrides


def measure(recipe: str, overrides: dict[str, str], warmup: int, steps: int) -> list[dict]:
    """Run warm-up + measured steps on a fresh Driver, print the report, return the metrics.

    The report is printed before the driver closes, so a hang in teardown cannot swallow it.
    """
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as out:
        settings = {
            "logging.progress_bar": "false",
            "logging.output_dir": out,
            "num_steps": str(warmup + steps),
            **overrides,
        }
        driver = Driver(load_config(recipe, settings))
        try:
            for _ in range(warmup):
                driver.step()
            metrics = [driver.step() for _ in range(steps)]
            describe_run(recipe, overrides, warmup, steps)
            report(metrics)
            return metrics
        finally:
            driver.close()


def read_metrics(path: str, warmup: int) -> list[dict]:
    """The step rows of a run's metrics.jsonl (evaluation rows skipped), after `warmup`."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in rows if "time/step" in r]
    return steps[warmup:]


def describe_run(recipe: str, overrides: dict[str, str], warmup: int, steps: int) -> None:
    where = "; ".join(f"{k}={v}" for k, v in overrides.items()) or "no overrides"
    resources = ray.cluster_resources()
    print(
        f"step overhead: {recipe} ({where}), {steps} steps after {warmup} warm-up; "
        f"cluster CPU {resources.get('CPU', 0):g} GPU {resources.get('GPU', 0):g}",
        flush=True,
    )


def report(metrics: list[dict]) -> None:
    """Median and mean of each part, in ms and as a share of the median step."""
    step = statistics.median(m["time/step"] for m in metrics)
    print(f"{'per step':26} {'median ms':>10} {'mean ms':>10} {'% of step':>10}")
    for name, part in PARTS.items():
        values = [part(m) for m in metrics]
        med = statistics.median(values)
        mean = statistics.fmean(values)
        print(f"{name:26} {med * 1e3:10.1f} {mean * 1e3:10.1f} {100 * med / step:9.1f}%")
    shares = [overhead(m) / m["time/step"] for m in metrics]
    print(
        f"overhead / step, median over steps: {100 * statistics.median(shares):.1f}% "
        f"(min {100 * min(shares):.1f}%, max {100 * max(shares):.1f}%)"
    )
    tokens = statistics.median(m["rollout/tokens"] for m in metrics)
    print(f"tokens per step (prompt + response): {tokens:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_RECIPE, help="recipe YAML file")
    parser.add_argument("--steps", type=int, default=20, help="measured steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. train.num_workers=1 (repeatable)",
    )
    parser.add_argument(
        "--from-metrics",
        metavar="JSONL",
        help="report on a finished run's metrics.jsonl instead of running (skips --warmup)",
    )
    args = parser.parse_args()
    if args.from_metrics:
        metrics = read_metrics(args.from_metrics, args.warmup)
        print(f"step overhead: {args.from_metrics}, {len(metrics)} steps after {args.warmup}")
        report(metrics)
        return
    measure(args.config, parse_overrides(args.set), args.warmup, args.steps)
    ray.shutdown()


if __name__ == "__main__":
    main()
