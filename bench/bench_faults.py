"""What a fault costs: a process killed with SIGKILL, to the next completed step.

Builds the real `Driver` for a recipe (default: recipes/tiny.yaml) and runs it step by step.
After `--warmup` steps it measures `--steps` undisturbed steps (the baseline step time), then
kills one process by pid between two steps and times from the kill to the end of the next
step that completes:
- `rollout`: a rollout actor (with the transformers engine also its engine). Ray restarts it;
  the step's prompt groups go to the live engine(s), and the restarted actor rejoins the
  weight group at the next weight update.
- `trainer`: a training actor. The driver replaces the training group and resumes from the
  last checkpoint (saved every `--save-interval` steps), so the cost includes the steps that
  are trained again.
Each case runs in its own driver, one after the other in one Ray instance; the cost is printed
in seconds and as a multiple of the baseline step measured in the same case.

    uv run python -m bench.bench_faults
    uv run python -m bench.bench_faults --faults rollout --steps 8
"""

import argparse
import json
import os
import signal
import statistics
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # workers use this venv as is

import ray

from config.loader import load_config
from driver import Driver

DEFAULT_RECIPE = "recipes/tiny.yaml"
VICTIMS = {"rollout": "sluice-rollout-1", "trainer": "sluice-train-1"}


def pid_of(name: str) -> int:
    """The process id of a named actor, asked of the actor itself (Ray's state API needs the
    dashboard, which the GPU machine's Ray lacks)."""
    return ray.get(ray.get_actor(name).__ray_call__.remote(lambda _: os.getpid()))


def measure(recipe: str, overrides: dict[str, str], fault: str, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        config = load_config(
            recipe,
            {
                **overrides,
                "num_steps": str(args.warmup + args.steps + args.save_interval + 2),
                "checkpoint.save": f"{out}/checkpoints",
                "checkpoint.save_interval": str(args.save_interval),
                "logging.output_dir": out,
                "logging.progress_bar": "false",
            },
        )
        with Driver(config) as driver:
            victim = pid_of(VICTIMS[fault])  # asked while idle: busy, it would answer late
            for _ in range(args.warmup):
                driver.step()
            steps = []
            for _ in range(args.steps):
                steps.append(driver.step()["time/step"])
                if driver.steps_done % args.save_interval == 0:
                    driver.save()
            while driver.steps_done % args.save_interval != args.save_interval - 1:
                driver.step()  # the kill comes one step before the next checkpoint
            before = driver.steps_done
            killed = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            first = driver.step()
            next_step = time.perf_counter() - killed
            repeated = before + 1 - driver.steps_done  # steps trained again (trainer restart)
            while driver.steps_done <= before:
                driver.step()
            recovered = time.perf_counter() - killed
            restarts = driver.engines.restarts, driver.trainer_restarts
    baseline = statistics.median(steps)
    return {
        "fault": fault,
        "baseline_step_s": round(baseline, 3),
        "kill_to_next_step_s": round(next_step, 3),
        "steps_repeated": repeated,
        "kill_to_step_after_kill_s": round(recovered, 3),
        "cost_in_steps": round((recovered - baseline) / baseline, 1),
        "next_step_phases_s": {
            phase: round(first[f"time/{phase}"], 3)
            for phase in ("rollout", "train", "rollout_ahead_wait", "sync")
        },
        "engine_restarts": restarts[0],
        "trainer_restarts": restarts[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=DEFAULT_RECIPE)
    parser.add_argument("--faults", nargs="+", choices=sorted(VICTIMS), default=sorted(VICTIMS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-interval", type=int, default=4)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    ray.init(address="local")
    try:
        for fault in args.faults:
            print(json.dumps(measure(args.recipe, overrides, fault, args)), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
