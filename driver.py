"""Sluice driver: the synchronous RL loop, as a class and as the command line.

    uv run driver.py                                  # the built-in tiny recipe
    uv run driver.py --config recipes/tiny.yaml --train.lr 3e-4 --num_steps 50
    uv run driver.py --dry-run                        # resolved config + placement plan

From Python:

    from config import load_config
    from driver import Driver
    with Driver(load_config("recipes/tiny.yaml")) as driver:
        metrics = driver.step()      # one rollout / train / weight-sync step
        summary = driver.run()       # the remaining steps, evaluations, final model

One step (what waits for what): the engines generate whole prompt groups and put Arrow
batches into the object store; the driver splits the references across the training ranks
by tokens (it never holds rows); every rank takes one optimizer step; then the leader rank
broadcasts the new weights to every engine, which must report the new version before the
next step's generation starts.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Under `uv run`, Ray (read at import) would rebuild this environment for every worker of a
# local cluster, which costs minutes; the local workers can use this interpreter as it is.
if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import torch
import yaml
from ray.exceptions import RayTaskError
from tqdm import tqdm

from actors.groups import RolloutGroup, TrainGroup
from actors.runtime import connect_ray
from actors.weight_sync import WeightSync
from config import SluiceConfig, UserError
from config.loader import describe_keys, load_config, to_dict, unknown_key_message
from config.schema import BUILTIN_MODEL
from data.balance import balance_by_tokens
from data.prompts import PromptStream
from data.sources import load_train_and_eval
from inference import check_engine_config
from models.loading import check_checkpoint_dir
from placement.cluster import read_cluster_shape, synthetic_cluster
from placement.groups import create_placement
from placement.planner import ClusterShape, plan_layout
from rl.rewards import load_reward_fn
from tracking.metrics import MetricsWriter, step_line
from training import check_backend_config
from training.backend import TrainStats

DEFAULT_RECIPE = Path(__file__).resolve().parent / "recipes" / "tiny.yaml"


class Driver:
    """Owns the actor groups of one run and steps them. Build it from a validated config."""

    def __init__(self, config: SluiceConfig, ray_address: str | None = None):
        self.config = config.validate()
        check_backend_config(config)
        check_engine_config(config)
        # Inputs that actors would otherwise trip over fail here, before any actor starts.
        load_reward_fn(config.rollout.reward)
        if config.model.hf_checkpoint != BUILTIN_MODEL:
            check_checkpoint_dir(config.model.hf_checkpoint)
        train, self.eval_prompts = load_train_and_eval(config.data, config.seed)
        self.prompts = PromptStream(train, config.seed, config.data.shuffle)
        self.output_dir = Path(config.logging.output_dir)
        connect_ray(ray_address)
        self.layout = plan_layout(read_cluster_shape(), config)
        self.placement = create_placement(self.layout)
        self.engines = RolloutGroup(config, self.placement)
        self.trainers = TrainGroup(config, self.placement)
        self.weights = WeightSync(config.weight_sync, self.trainers, self.engines, self.layout)
        self.weights.setup()
        self.weights.sync(version=0)  # engines start from exactly the trainer's weights
        self.version = 0
        self.steps_done = 0
        self.metrics = MetricsWriter(self.output_dir)
        (self.output_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))

    def step(self) -> dict[str, float]:
        """One synchronous RL step: rollout, train, weight sync. Returns the step's metrics."""
        c = self.config
        start = time.perf_counter()
        results = self.engines.generate(self.prompts.next_groups(c.rollout.prompts_per_step))
        rollout_done = time.perf_counter()
        batches = [b for r in results for b in r.batches]
        shares = balance_by_tokens(batches, self.trainers.data_parallel_size)
        if c.algorithm.loss_aggregation == "token_mean":
            normalizer = sum(b.num_loss_tokens for b in batches)
        else:
            normalizer = sum(b.num_samples for b in batches)
        train_stats = self.trainers.train(shares, normalizer)
        train_done = time.perf_counter()
        self.version += 1
        sync = self.weights.sync(self.version)
        end = time.perf_counter()
        self.steps_done += 1
        metrics = {
            **rollout_metrics(results, rollout_done - start),
            **TrainStats.reduce(train_stats),
            "time/rollout": rollout_done - start,
            "time/train": train_done - rollout_done,
            "time/sync": end - train_done,
            "time/step": end - start,
            "sync/gb_per_s": sync.gb_per_s,
            "sync/bytes": sync.nbytes,
            "weight_version": self.version,
        }
        metrics["perf/tokens_per_s"] = metrics["rollout/tokens"] / metrics["time/step"]
        self.metrics.write(self.steps_done, metrics)
        return metrics

    def evaluate(self) -> dict[str, float] | None:
        """Greedy accuracy on the held-out prompts (None when the run has none)."""
        if not self.eval_prompts:
            return None
        results = self.engines.evaluate(self.eval_prompts)
        prompts = sum(r.prompts for r in results)
        metrics = {
            "eval/accuracy": sum(r.correct for r in results) / prompts,
            "eval/reward_mean": sum(r.reward_sum for r in results) / prompts,
        }
        self.metrics.write(self.steps_done, metrics)
        return metrics

    def run(self) -> dict:
        """Run the remaining steps with evaluations; save the model; write summary.json."""
        c = self.config
        start = time.perf_counter()
        first = self.evaluate()
        last = first
        bar = tqdm(
            total=c.num_steps,
            initial=self.steps_done,
            disable=not c.logging.progress_bar,
            desc="sluice",
            unit="step",
            file=sys.stdout,
        )
        while self.steps_done < c.num_steps:
            metrics = self.step()
            bar.update(1)
            tqdm.write(step_line(self.steps_done, c.num_steps, metrics), file=sys.stdout)
            every = c.logging.eval_every
            if self.steps_done == c.num_steps or (every and self.steps_done % every == 0):
                last = self.evaluate()
                if last:
                    tqdm.write(
                        f"eval after step {self.steps_done}: accuracy {last['eval/accuracy']:.3f}",
                        file=sys.stdout,
                    )
        bar.close()
        if c.logging.save_final_model:
            self.trainers.save_hf(str((self.output_dir / "final_model").resolve()))
        summary = {
            "steps": self.steps_done,
            "first_eval_accuracy": first["eval/accuracy"] if first else None,
            "last_eval_accuracy": last["eval/accuracy"] if last else None,
            "weight_version": self.version,
            "wall_seconds": time.perf_counter() - start,
        }
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def close(self) -> None:
        self.metrics.close()
        self.engines.shutdown()
        self.trainers.shutdown()
        self.placement.remove()

    def __enter__(self) -> "Driver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rollout_metrics(results: list, seconds: float) -> dict[str, float]:
    samples = sum(r.stats.samples for r in results)
    response_tokens = sum(r.stats.response_tokens for r in results)
    return {
        "rollout/reward_mean": sum(r.stats.reward_sum for r in results) / samples,
        "rollout/accuracy": sum(r.stats.correct for r in results) / samples,
        "rollout/response_length_mean": response_tokens / samples,
        "rollout/truncated_fraction": sum(r.stats.truncated for r in results) / samples,
        "rollout/tokens": response_tokens + sum(r.stats.prompt_tokens for r in results),
        "rollout/generate_seconds": max(r.stats.generate_seconds for r in results),
        "rollout/tokens_per_s": response_tokens / seconds if seconds > 0 else 0.0,
        "rollout/weight_version": min(v for r in results for v in r.stats.weight_versions),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="driver.py",
        description="Sluice: RL post-training on Ray. Every config key is also a --flag.",
    )
    parser.add_argument("--config", default=str(DEFAULT_RECIPE), help="recipe YAML file")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and placement plan"
    )
    parser.add_argument(
        "--cluster",
        metavar="NODESxGPUS",
        help="with --dry-run: plan for a hypothetical cluster, e.g. 3x8 (default: the cluster "
        "at RAY_ADDRESS, else this machine)",
    )
    keys = parser.add_argument_group("config keys (override the recipe)")
    for key, default, doc in describe_keys():
        keys.add_argument(f"--{key}", dest=f"set:{key}", metavar="VALUE", help=f"{doc} [{default}]")
    return parser


def parse_args(argv: list[str]) -> tuple[SluiceConfig, argparse.Namespace]:
    """Recipe + `--section.key value` overrides -> a validated config (UserError otherwise)."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        key = flag.lstrip("-").split("=", 1)[0]
        raise UserError(unknown_key_message(key, "command line", flag_prefix="--"))
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("set:") and v is not None}
    return load_config(args.config, overrides), args


def dry_run(config: SluiceConfig, cluster_spec: str | None) -> None:
    """Print the resolved config and where every actor would go; starts nothing."""
    check_backend_config(config)
    check_engine_config(config)
    print(yaml.safe_dump(to_dict(config), sort_keys=False).rstrip(), end="\n\n")
    if cluster_spec:
        cluster = parse_cluster_spec(cluster_spec)
    elif os.environ.get("RAY_ADDRESS"):
        connect_ray()
        cluster = read_cluster_shape()
    else:
        cluster = synthetic_cluster(1, torch.cuda.device_count(), float(os.cpu_count() or 1))
    print(plan_layout(cluster, config).describe())


def parse_cluster_spec(spec: str) -> ClusterShape:
    try:
        nodes, gpus = (int(part) for part in spec.lower().split("x"))
    except ValueError:
        raise UserError(f"--cluster {spec!r} should look like NODESxGPUS, e.g. 3x8") from None
    return synthetic_cluster(nodes, gpus, 8.0 * max(gpus, 1))


def main(argv: list[str] | None = None) -> int:
    try:
        config, args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.dry_run:
            dry_run(config, args.cluster)
            return 0
        with Driver(config) as driver:
            summary = driver.run()
        print(json.dumps(summary))
        return 0
    except UserError as error:
        # An actor's UserError arrives as a RayTaskError that is also a UserError; print the
        # original message, not the remote traceback.
        cause = error.cause if isinstance(error, RayTaskError) else error
        print(f"error: {cause}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
