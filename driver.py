"""Sluice's command line, and the `Driver` class for Python use (defined in `actors/loop.py`).

    uv run driver.py                                  # the built-in tiny recipe
    uv run driver.py --config recipes/tiny.yaml --train.lr 3e-4 --num_steps 50
    uv run driver.py --dry-run                        # resolved config + placement plan

From Python:

    from config import load_config
    from driver import Driver
    with Driver(load_config("recipes/tiny.yaml")) as driver:
        metrics = driver.step()      # one rollout / train / weight-sync step
        summary = driver.run()       # the remaining steps, evaluations, final model

Only the configuration modules are imported up front, so `--help`, `--dry-run` and input
errors answer in a few seconds; torch, transformers and Ray load when a run starts.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

# Under `uv run`, Ray (read at import) would rebuild this environment for every worker of a
# local cluster, which costs minutes; the local workers can use this interpreter as it is.
if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from config import SluiceConfig, UserError
from config.loader import describe_keys, load_config, to_dict, unknown_key_message
from config.schema import BUILTIN_MODEL, loss_settings_line
from config.seed_flags import (
    add_seed_flags,
    alias_names,
    given_aliases,
    given_script_flags,
    merge_aliases,
    unaliased_flag_message,
)
from config.slime_script import check_model_flags, check_restated, derived_overrides
from inference.sglang.flags import over_recipe, split_cli_flags
from placement.cluster import synthetic_cluster
from placement.planner import ClusterShape, plan_layout

DEFAULT_RECIPE = Path(__file__).resolve().parent / "recipes" / "tiny.yaml"


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one-line UserErrors (exit 2, no usage dump)."""

    def error(self, message: str):
        raise UserError(f"command line: {message} (driver.py --help lists every option)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="driver.py",
        allow_abbrev=False,  # `--num_step 5` must not quietly mean --num_steps
        description="Sluice: RL post-training on Ray. Every config key is also a --flag.",
    )
    parser.add_argument("--config", default=str(DEFAULT_RECIPE), help="recipe YAML file")
    parser.add_argument(
        "--sglang-FLAG",
        metavar="VALUE",
        help="any server flag of sglang.launch_server, e.g. --sglang-mem-fraction-static 0.7 "
        "(= rollout.sglang.server_args; checked against the pinned SGLang's flags)",
    )
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
    add_seed_flags(parser)
    return parser


def parse_args(argv: list[str]) -> tuple[SluiceConfig, argparse.Namespace]:
    """Recipe + `--section.key value` overrides (or their slime names, see
    `config.seed_flags`) -> a validated config (UserError otherwise)."""
    argv, sglang_flags = split_cli_flags(argv)
    args, unknown = build_parser().parse_known_args(_negative_values_attached(argv))
    if unknown:
        raise UserError(unknown_flag_message(unknown))
    keyed = {k[4:]: v for k, v in vars(args).items() if k.startswith("set:") and v is not None}
    restated, model_flags, derived = given_script_flags(args)
    args.notes = check_restated(restated)
    overrides = merge_aliases(keyed, given_aliases(args))
    overrides |= derived_overrides(derived, overrides, args.config)
    config = load_config(args.config, overrides)
    if sglang_flags:  # on top of the recipe's server_args, flag by flag
        server_args = config.rollout.sglang.server_args
        config.rollout.sglang.server_args = over_recipe(server_args, sglang_flags)
        config.validate()
    args.notes += check_model_flags(config.model, model_flags)
    return config, args


def tiny_recipe_notice(config: SluiceConfig, recipe: str) -> str | None:
    """What to tell someone who brings a model but no recipe: the built-in recipe's settings,
    made for a random tiny model, would otherwise apply to theirs unnoticed."""
    if Path(recipe).resolve() != DEFAULT_RECIPE or config.model.hf_checkpoint == BUILTIN_MODEL:
        return None
    return (
        f"model.hf_checkpoint={config.model.hf_checkpoint} runs with the built-in tiny recipe's "
        f"settings (rollout.max_new_tokens {config.rollout.max_new_tokens}, rollout.reward "
        f"{config.rollout.reward}, logging.output_dir {config.logging.output_dir}); for a real "
        "model start from --config recipes/your-model.yaml"
    )


NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _negative_values_attached(argv: list[str]) -> list[str]:
    """`--key -1e-3` as `--key=-1e-3`: argparse takes a token that starts with a dash for an
    option unless it reads as a plain negative number, and exponents do not. The command
    line has no positional arguments, so a number after a flag is always its value."""
    out: list[str] = []
    for token in argv:
        if out and NEGATIVE_NUMBER.match(token) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def unknown_flag_message(unknown: list[str]) -> str:
    """The first unrecognised flag, with the nearest key or slime name it may have meant."""
    flag = next((u for u in unknown if u.startswith("-")), unknown[0])
    key = flag.lstrip("-").split("=", 1)[0]
    return unaliased_flag_message(flag) or unknown_key_message(
        key, "command line", flag_prefix="--", also=alias_names()
    )


def dry_run(config: SluiceConfig, cluster_spec: str | None) -> None:
    """Print the resolved config and where every actor would go; starts nothing.

    It runs the checks a run makes before starting Ray (actors/preflight.py), in planning
    mode: the model, data or checkpoint of a cluster's shared file system may not be visible
    where one plans, so what is not readable here is said to be read at start-up."""
    import yaml

    from actors.preflight import check_hardware, check_run

    inputs = check_run(config, planning=True)
    loss, fp8 = inputs.loss, inputs.fp8
    if cluster_spec:
        cluster = parse_cluster_spec(cluster_spec)
    elif os.environ.get("RAY_ADDRESS"):
        from actors.runtime import connect_ray
        from placement.cluster import read_cluster_shape

        connect_ray()
        cluster = read_cluster_shape()
    else:
        import torch

        cluster = synthetic_cluster(1, torch.cuda.device_count(), float(os.cpu_count() or 1))
    layout = plan_layout(cluster, config)
    check_hardware(config, layout.use_gpus, layout.colocate, inputs.model_readable)
    # Every check passed: print the plan (an error above leaves stdout empty).
    print(yaml.safe_dump(to_dict(config), sort_keys=False).rstrip(), end="\n\n")
    weights = "as trained"
    if fp8 is not None:
        weights = f"fp8 e4m3 in {fp8.block_size[0]}x{fp8.block_size[1]} blocks ({fp8.source})"
    tis = f"on, cap {loss.tis_cap:g}" if loss.tis else "off"
    if inputs.model_readable:  # else whether the rollouts are fp8 is not known here
        print(f"# rollout weights: {weights}; TIS {tis}; ratio denominator: {loss.old_log_probs}")
    if loss_line := loss_settings_line(config.algorithm):
        print(f"# {loss_line}")
    for note in inputs.notes:
        print(f"# {note}")
    print()
    print(layout.describe())
    from placement.multinode import apply_cpu_adam_rule

    if notice := apply_cpu_adam_rule(config, layout):
        print(f"\nnote: {notice}")
    if config.rollout.engine == "sglang":
        from inference.sglang.launch import describe_engines

        print("\n" + describe_engines(config, layout))


def parse_cluster_spec(spec: str) -> ClusterShape:
    try:
        nodes, gpus = (int(part) for part in spec.lower().split("x"))
    except ValueError:
        raise UserError(f"--cluster {spec!r} should look like NODESxGPUS, e.g. 3x8") from None
    return synthetic_cluster(nodes, gpus, 8.0 * max(gpus, 1))


def main(argv: list[str] | None = None) -> int:
    # Modules in the working directory (a reward function) import here as in the actors
    # (actors.runtime.worker_pythonpath) and as under `ray job submit --working-dir .`; a
    # script's own sys.path holds only its folder.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    config = None
    try:
        config, args = parse_args(sys.argv[1:] if argv is None else argv)
        for note in args.notes:  # slime flags accepted without a key of their own
            print(f"sluice: note: {note}", file=sys.stderr, flush=True)
        # Told once the config is known to be good (a refused input's error stays alone).
        tiny_notice = tiny_recipe_notice(config, args.config)
        if args.dry_run:
            dry_run(config, args.cluster)
            if tiny_notice:
                print(f"sluice: note: {tiny_notice}", file=sys.stderr, flush=True)
            return 0
        if args.cluster and not args.dry_run:
            raise UserError("--cluster only plans a dry run; add --dry-run, or drop --cluster")
        from actors.loop import SHUTDOWN_TIMEOUT_S, Driver
        from actors.stopping import StopRequest, job_stop_wait_notice

        if tiny_notice:
            print(f"sluice: note: {tiny_notice}", file=sys.stderr, flush=True)
        if notice := job_stop_wait_notice(config.timeouts, SHUTDOWN_TIMEOUT_S):
            print(f"sluice: warning: {notice}", file=sys.stderr, flush=True)
        stop = StopRequest()
        stop.install()  # a signal during start-up stops the run before its first step
        with Driver(config, stop=stop) as driver:
            summary = driver.run()
        print(json.dumps(summary))
        return stop.exit_code
    except KeyboardInterrupt:  # before the stop handler was in place
        print("sluice: interrupted before the run started", file=sys.stderr)
        return 130
    except Exception as error:
        from actors.failures import report

        output_dir = Path(config.logging.output_dir) if config is not None else None
        failure = report(error, output_dir)
        print(f"error: {failure.line}", file=sys.stderr)
        return failure.exit_code


def __getattr__(name: str):
    """`from driver import Driver` without paying for torch and Ray at CLI start-up."""
    if name == "Driver":
        from actors.loop import Driver

        return Driver
    raise AttributeError(f"module 'driver' has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
