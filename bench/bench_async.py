"""On-policy against one-step-off (`algorithm.max_staleness`): the same recipe, the same run.

Builds the real `Driver` for a recipe (default: recipes/tiny.yaml, engines on their own
devices) once per staleness bound, in one Ray instance, runs `--warmup` untimed steps, then
`--steps` measured ones, and prints per bound the medians of: step time, tokens per second
(and their ratio against on-policy, max_staleness 0, measured in the same run), the engines'
generation time, the training time, the driver's waits (for this step's rollouts at the
start, and for the generation running ahead before the weight update), the weight sync, and
the largest version lag. With staleness 1 the next step generates while a step trains, so
the step costs about max(generation, training) instead of their sum, where the machine has
the cores (or GPUs) to run both at once.

2 or more is refused by the config: the engines drain before every weight update, so one
step's generation at most overlaps training whatever the bound. Measured before the cap
(bench/RESULTS.md, "More than one step ahead"): with generation slower than training, 2 had
the same waits as 1 (each step waited for the generation it started, step = one generation)
and twice the version lag, with tokens/s within the noise of 1.

    uv run python -m bench.bench_async
    uv run python -m bench.bench_async --steps 12 --set rollout.num_engines=1
    # generation slower than training (about 3 x on 2 cores):
    uv run python -m bench.bench_async --set rollout.max_new_tokens=32 rollout.max_batch_size=32
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


def measure(recipe: str, overrides: dict[str, str], staleness: int, steps: int, warmup: int):
    """Median step time, tokens/s and version lag of `steps` steps after `warmup`."""
    with tempfile.TemporaryDirectory() as out:
        config = load_config(
            recipe,
            {
                **overrides,
                "algorithm.max_staleness": str(staleness),
                "num_steps": str(warmup + steps),
                "logging.output_dir": out,
                "logging.progress_bar": "false",
            },
        )
        with Driver(config) as driver:
            measured = [driver.step() for _ in range(warmup + steps)][warmup:]
    return {
        "max_staleness": staleness,
        "step_s": statistics.median(m["time/step"] for m in measured),
        "tokens_per_s": statistics.median(m["perf/tokens_per_s"] for m in measured),
        "generate_s": statistics.median(m["rollout/generate_seconds"] for m in measured),
        "train_s": statistics.median(m["time/train"] for m in measured),
        "rollout_wait_s": statistics.median(m["time/rollout"] for m in measured),
        "ahead_wait_s": statistics.median(m["time/rollout_ahead_wait"] for m in measured),
        "sync_s": statistics.median(m["time/sync"] for m in measured),
        "version_lag": max(m["async/version_lag"] for m in measured),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=DEFAULT_RECIPE)
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], help="KEY=VALUE config overrides")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    ray.init(address="local", logging_level="ERROR")
    results = [measure(args.recipe, overrides, n, args.steps, args.warmup) for n in args.staleness]
    base = next((r for r in results if r["max_staleness"] == 0), results[0])
    print(f"{'max_staleness':>13} {'step s':>8} {'tokens/s':>10} {'x tokens/s':>10} "
          f"{'gen s':>8} {'train s':>8} {'wait s':>8} {'ahead s':>8} {'sync s':>8} "
          f"{'lag':>4}")  # fmt: skip
    for r in results:
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        print(
            f"{r['max_staleness']:>13} {r['step_s']:>8.3f} {r['tokens_per_s']:>10.0f} "
            f"{ratio:>10.2f} {r['generate_s']:>8.3f} {r['train_s']:>8.3f} "
            f"{r['rollout_wait_s']:>8.3f} {r['ahead_wait_s']:>8.3f} {r['sync_s']:>8.3f} "
            f"{r['version_lag']:>4}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
