"""slime/Megatron flag names on the driver's command line: a seed's argument arrays parse into
our keys, an alias that disagrees with its key is an error, and `--help` lists the aliases.

Every case but one calls the driver's own functions in this process (no Ray, no torch); the
`--dry-run` case runs `driver.py` once as a subprocess, as a user would.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import driver
from config.loader import all_keys, describe_keys
from config.seed_flags import NOT_ALIASED, SEED_FLAGS

REPO = Path(__file__).resolve().parent.parent

# The seed's arrays, verbatim.
PERF_ARGS = [
    *("--tensor-model-parallel-size", "4"),
    "--sequence-parallel",
    *("--pipeline-model-parallel-size", "1"),
    *("--context-parallel-size", "1"),
    *("--expert-model-parallel-size", "8"),
    *("--expert-tensor-parallel-size", "1"),
]
OPTIMIZER_ARGS = [
    "--optimizer-cpu-offload",
    "--overlap-cpu-optimizer-d2h-h2d",
    "--use-precision-aware-optimizer",
]
# tensor 4 needs a world that divides by 4; the tiny recipe has 2 ranks.
EIGHT_RANKS = ["--train.num_workers", "8"]


def parse(*argv: str):
    """The config the driver builds from `argv` (on top of the tiny recipe)."""
    config, _ = driver.parse_args(list(argv))
    return config


def cli_error(capsys, *argv: str) -> str:
    """Run the driver's main() on a bad command line: exit code 2 and one `error:` line."""
    assert driver.main(list(argv)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_the_seed_perf_args_set_the_parallel_layout():
    p = parse(*PERF_ARGS, *EIGHT_RANKS).train.parallel
    assert (p.tensor, p.pipeline, p.context, p.expert, p.expert_tensor) == (4, 1, 1, 8, 1)
    assert p.sequence is True


def test_the_seed_optimizer_args_switch_on_cpu_adam():
    t = parse(*OPTIMIZER_ARGS).train
    assert t.optimizer_cpu_offload and t.overlap_cpu_optimizer_d2h_h2d
    assert t.use_precision_aware_optimizer
    defaults = parse().train
    assert not defaults.optimizer_cpu_offload and not defaults.use_precision_aware_optimizer


@pytest.mark.parametrize(
    ("argv", "key", "expected"),
    [
        (["--max-tokens-per-gpu", "4096"], "train.max_tokens_per_micro_batch", 4096),
        (["--use-dynamic-batch-size"], "train.pack_sequences", True),
        (["--lr", "1e-6"], "train.lr", 1e-6),
        (["--adam-beta1", "0.8"], "train.adam_beta1", 0.8),
        (["--adam-beta2", "0.98"], "train.adam_beta2", 0.98),
        (["--weight-decay", "0.1"], "train.weight_decay", 0.1),
        (["--clip-grad", "0.5"], "train.grad_clip", 0.5),
        (["--lr-decay-style", "cosine"], "train.lr_decay_style", "cosine"),
        (["--lr-warmup-iters", "10"], "train.lr_warmup_iters", 10),
        (["--lr-decay-style", "linear", "--min-lr", "1e-6"], "train.min_lr", 1e-6),
        (["--lr-decay-style", "linear", "--lr-decay-iters", "500"], "train.lr_decay_iters", 500),
        (
            ["--hf-checkpoint", "/models/Qwen3-30B-A3B"],
            "model.hf_checkpoint",
            "/models/Qwen3-30B-A3B",
        ),
        (["--load", "/ckpt/in"], "checkpoint.load", "/ckpt/in"),
        (["--save", "/ckpt/out"], "checkpoint.save", "/ckpt/out"),
        (
            ["--save-interval", "20", "--save", "/ckpt/out"],
            "checkpoint.save_interval",
            20,
        ),
        (["--num-rollout", "3000"], "num_steps", 3000),
        (["--seed", "42"], "seed", 42),
        (["--n-samples-per-prompt", "16"], "rollout.samples_per_prompt", 16),
        (["--rollout-max-response-len", "8192"], "rollout.max_new_tokens", 8192),
        (["--rollout-temperature", "0.8"], "rollout.temperature", 0.8),
        (["--rollout-num-gpus-per-engine", "8"], "rollout.gpus_per_engine", 8),
        (["--lr=3e-4"], "train.lr", 3e-4),
        (["--use-tis"], "algorithm.tis", "on"),
        (["--use-rollout-routing-replay"], "algorithm.routing_replay", True),
        (["--use-routing-replay"], "algorithm.routing_replay", True),
        (["--use-tis", "false"], "algorithm.tis", "off"),
        (["--tis-clip", "1.5"], "algorithm.tis_cap", 1.5),
        (["--tis-clip-low", "0.1"], "algorithm.tis_floor", 0.1),
        (["--entropy-coef", "0.01"], "algorithm.entropy_coef", 0.01),
        (["--log-probs-chunk-size", "2048"], "train.log_prob_chunk_tokens", 2048),
        (["--log-probs-chunk-size", "-1"], "train.log_prob_chunk_tokens", -1),  # slime's "off"
        (["--advantage-estimator", "gspo"], "algorithm.loss", "gspo"),
        (["--advantage-estimator", "grpo"], "algorithm.loss", "grpo"),
        (
            [
                "--dynamic-sampling-filter-path",
                "slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std",
            ],
            "rollout.dynamic_sampling",
            True,
        ),
        (
            ["--advantage-estimator", "reinforce_plus_plus_baseline"],
            "algorithm.advantage",
            "reinforce_plus_plus_baseline",
        ),
    ],
)
def test_each_value_flag_sets_its_key(argv, key, expected):
    value = parse(*argv)
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--sequence-parallel"], True),
        (["--sequence-parallel", "true"], True),
        (["--sequence-parallel=false"], False),
        (["--sequence-parallel", "false", "--train.num_workers", "8"], False),
    ],
)
def test_a_switch_takes_no_value_or_an_explicit_bool(argv, expected):
    assert parse("--tensor-model-parallel-size", "2", *argv).train.parallel.sequence is expected


@pytest.mark.parametrize(
    ("argv", "expected"),
    [([], "torch"), (["--moe-grouped-gemm"], "torch"), (["--moe-grouped-gemm", "false"], "local")],
)
def test_moe_grouped_gemm_picks_the_megatron_layer_spec(argv, expected):
    assert parse(*argv).train.layer_spec == expected


def test_the_later_of_two_identical_flags_wins():
    assert parse("--lr", "1e-4", "--lr", "2e-4").train.lr == 2e-4


def test_an_alias_and_its_key_may_agree():
    assert parse("--lr", "1e-4", "--train.lr", "0.0001").train.lr == 1e-4
    config = parse("--sequence-parallel", "--train.parallel.sequence", "true")
    assert config.train.parallel.sequence is True


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--lr", "1e-4", "--train.lr", "2e-4"], ["--lr 1e-4", "--train.lr 2e-4"]),
        (
            ["--train.parallel.tensor", "2", "--tensor-model-parallel-size", "4"],
            ["--tensor-model-parallel-size 4", "--train.parallel.tensor 2"],
        ),
        (
            ["--sequence-parallel", "--train.parallel.sequence", "false"],
            ["--sequence-parallel and", "--train.parallel.sequence false"],
        ),
    ],
)
def test_an_alias_and_its_key_with_different_values_is_exit_code_2(capsys, argv, names):
    line = cli_error(capsys, *argv)
    for name in names:
        assert name in line
    assert "different values" in line


def test_an_advantage_estimator_sluice_lacks_is_refused_with_the_ones_it_has(capsys):
    line = cli_error(capsys, "--advantage-estimator", "ppo")
    assert "'ppo' is not one of the values Sluice has: grpo, gspo" in line
    line = cli_error(capsys, "--dynamic-sampling-filter-path", "my_filters.keep_hard")
    assert "'my_filters.keep_hard' is not one of the values Sluice has" in line
    line = cli_error(capsys, "--advantage-estimator", "gspo", "--algorithm.loss", "grpo")
    assert "--advantage-estimator gspo and --algorithm.loss grpo" in line


def test_a_bad_value_names_the_alias(capsys):
    line = cli_error(capsys, "--sequence-parallel", "4")
    assert "--sequence-parallel" in line and "train.parallel.sequence=4 should be bool" in line
    assert "--lr" in cli_error(capsys, "--lr", "abc")


def test_a_mistyped_flag_suggests_the_nearest_alias(capsys):
    line = cli_error(capsys, "--tensor-model-paralel-size", "4")
    assert "unknown config key '--tensor-model-paralel-size'" in line
    assert "did you mean --tensor-model-parallel-size" in line


def test_slime_rollout_batch_size_counts_prompts():
    # slime counts prompts per step, rollout.batch_size samples: 32 x the tiny recipe's 8.
    assert parse("--rollout-batch-size", "32").rollout.batch_size == 256
    config = parse("--rollout-batch-size", "8", "--n-samples-per-prompt", "4")
    assert config.rollout.batch_size == 32


def test_help_lists_every_alias_with_its_key():
    text = driver.build_parser().format_help()
    section = text[text.index("Megatron / slime flag names:") :]
    compact = " ".join(section.split())  # argparse wraps long lines
    for flag, alias in SEED_FLAGS.items():
        if alias.keyed_values:  # one key per value: each is listed (long words wrap anywhere)
            squashed = "".join(section.split())
            for value, key, key_value in alias.keyed_values:
                assert f"{value}=--{key}{key_value}" in squashed
            continue
        if alias.pairs:  # slime's --eval-prompt-data aime PATH [NAME PATH ...]
            assert f"{flag} NAME VALUE [NAME VALUE ...] = --{alias.key}" in compact
            continue
        assert f"{flag} {'[BOOL]' if alias.switch else 'VALUE'} = --{alias.key}" in compact
    assert "--rollout-batch-size" in compact


def test_every_alias_names_a_key_and_no_alias_shadows_one():
    keys = set(all_keys())
    flags_of_keys = {f"--{key}" for key in keys}
    bools = {key for key, default, _ in describe_keys() if isinstance(default, bool)}
    for flag, alias in SEED_FLAGS.items():
        assert alias.key in keys, flag
        assert flag not in flags_of_keys, flag
        # A switch sets a boolean key, or maps true/false onto the key's own values; a flag
        # whose values name what they set takes a value.
        switch = (alias.key in bools and not alias.keyed_values) or any(
            value in ("true", "false") for value, _ in alias.values
        )
        assert alias.switch == switch, flag
    assert not set(NOT_ALIASED) & set(SEED_FLAGS)


def test_dry_run_shows_the_aliased_values():
    # Aliases the default torch backend accepts (the parallel and CPU-Adam flags need the
    # megatron backend and a model that divides by their sizes; parsing them is tested above).
    argv = [
        *("--dry-run", "--cluster", "1x8"),
        *("--lr", "3e-4", "--num-rollout", "5", "--n-samples-per-prompt", "4"),
        *("--rollout-temperature", "0.7", "--clip-grad", "0.5", "--max-tokens-per-gpu", "4096"),
        "--use-distributed-optimizer",
    ]
    done = subprocess.run(
        [sys.executable, "driver.py", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # never a cluster
    )
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout.partition("\n\nplacement: ")[0])
    assert config["num_steps"] == 5
    assert config["train"]["lr"] == 3e-4 and config["train"]["grad_clip"] == 0.5
    assert config["train"]["max_tokens_per_micro_batch"] == 4096
    assert config["train"]["use_distributed_optimizer"] is True
    assert config["rollout"]["samples_per_prompt"] == 4
    assert config["rollout"]["temperature"] == 0.7
