"""The command line as a user meets it: every kind of bad input ends with one `error:` line on
stderr, exit code 2 and no traceback; `--dry-run` and `--help` work without starting Ray.

How the cases run. A fresh `python driver.py` per case would cost minutes of imports on a
2-core machine, so the cases that stop before Ray run as children of one interpreter that pays
for the imports once (`tests/forked_driver.py`). Set SLUICE_TEST_CLI_FRESH=1 to run each of
them as its own `python driver.py ...` instead. The raising-reward case always runs fresh: it
starts a local Ray cluster whose workers must import the user's reward module from the working
directory.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from config import load_config
from config.loader import describe_keys, to_dict

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"
FRESH = os.environ.get("SLUICE_TEST_CLI_FRESH") == "1"

# Keeps a run small in case a case that should fail at validation went on to train.
SMALL_RUN = {
    "num_steps": "1",
    "rollout.batch_size": "16",
    "rollout.samples_per_prompt": "8",
    "train.num_workers": "1",
    "rollout.num_engines": "1",
    "data.num_eval_prompts": "8",
    "logging.progress_bar": "false",
}
SMALL = [arg for key, value in SMALL_RUN.items() for arg in (f"--{key}", value)]

FORKED_DRIVER = REPO / "tests" / "forked_driver.py"
"""Runs the cases that stop before Ray as children of one pre-imported interpreter."""


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str

    def error_line(self) -> str:
        """The single line on stderr; fails the test on anything else."""
        assert "Traceback" not in self.stderr, self.stderr
        lines = self.stderr.splitlines()
        assert len(lines) == 1, f"stderr is not one line:\n{self.stderr}"
        assert lines[0].startswith("error: "), lines[0]
        return lines[0]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never a real cluster
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    return env | extra


def run_fresh(argv: list[str], env: dict[str, str], timeout: float, cwd: Path = REPO) -> Result:
    done = subprocess.run(
        [sys.executable, str(REPO / "driver.py"), *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def run_forked(cases: list[list[str]], env: dict[str, str], work: Path) -> list[Result]:
    (work / "cases.json").write_text(json.dumps(cases))
    subprocess.run(
        [sys.executable, FORKED_DRIVER, work / "cases.json", work / "results.json", "120"],
        cwd=REPO,
        env=env,
        check=True,
        timeout=600,
    )
    return [Result(**r) for r in json.loads((work / "results.json").read_text())]


# --- the cases that stop before Ray: all run once, in one batch -----------------------------


def write_inputs(data: Path) -> dict[str, list[str]]:
    """Bad (and good) inputs on disk; returns each case's command line."""
    (data / "a_directory").mkdir()
    (data / "prompts.csv").write_text("prompt,label\n1 2 3 4 =,1\n")
    (data / "empty.jsonl").write_text("")
    rows = ['{"prompt": "1 2 3 4 =", "label": "1"}', "", '{"prompt": "5 6 7 8 =", "label": "5"}']
    (data / "rows.jsonl").write_text("\n".join([*rows, '{"question": "9 9 9 9 ="}']) + "\n")
    (data / "typo.yaml").write_text("num_steps: 1\ntrain:\n  lrr: 0.1\n")
    (data / "words.jsonl").write_text('{"prompt": "1 2 =", "label": "1"}\n{"prompt": "3,7="}\n')
    (data / "broken.jsonl").write_text('{"prompt": "1 2 ="}\n{"prompt": "1 2", "label": 1 "x"}\n')
    (data / "a_file").write_text("")
    earlier = data / "earlier_run"  # another run's results, which must survive
    earlier.mkdir()
    (earlier / "metrics.jsonl").write_text('{"step": 1, "rollout/reward_mean": 0.5}\n')
    small = [*SMALL, "--logging.output_dir", str(data / "out")]
    megatron = ["--train.backend", "megatron", "--expert-model-parallel-size", "2"]
    return {
        "missing_file": [*small, "--data.prompt_data", str(data / "missing.jsonl")],
        # Tests run as root, which reads any file whatever its mode, so "unreadable" is a
        # directory and a file of a format we cannot read rather than a chmod 000 file.
        "directory": [*small, "--data.prompt_data", str(data / "a_directory")],
        "unsupported_extension": [*small, "--data.prompt_data", str(data / "prompts.csv")],
        "row_without_input_key": [*small, "--data.prompt_data", str(data / "rows.jsonl")],
        "empty_data": [*small, "--data.prompt_data", str(data / "empty.jsonl")],
        "unknown_flag": [*small, "--train.lrr", "1"],
        "unknown_recipe_key": ["--config", str(data / "typo.yaml"), *small],
        "reward_does_not_import": [*small, "--rollout.reward", "nosuchmodule:fn"],
        "environment_does_not_import": [*small, "--rollout.environment", "nosuchenv:Env"],
        "tool_does_not_import": [
            *(*small, "--rollout.environment", "tasks.lookup:LookupEnvironment"),
            *("--rollout.tools", "{lookup: nosuchtool:fn}"),
        ],
        "batch_not_divisible": [*small, "--rollout.batch_size", "250"],
        "flag_without_value": [*small, "--num_steps"],
        "abbreviated_flag": ["--dry-run", "--num_step", "5"],
        "dry_run": ["--dry-run"],
        "dry_run_3x8": [
            *("--dry-run", "--cluster", "3x8", "--train.num_workers", "16"),
            *("--rollout.num_engines", "8"),
        ],
        # Megatron's and SGLang's layout (TP 4, one 8-GPU engine); the torch backend and the
        # transformers engine refuse it rather than ignore the sizes.
        "dry_run_layout_the_backend_cannot_run": [
            *("--dry-run", "--cluster", "3x8", "--train.num_workers", "16"),
            *("--train.parallel.tensor", "4", "--rollout.num_engines", "1"),
            *("--rollout.gpus_per_engine", "8"),
        ],
        "help": ["--help"],
        "output_dir_is_a_file": [*SMALL, "--logging.output_dir", str(data / "a_file")],
        "output_dir_inside_a_file": [*SMALL, "--logging.output_dir", str(data / "a_file/run")],
        "output_dir_holds_another_run": [*SMALL, "--logging.output_dir", str(earlier)],
        "dry_run_output_dir_holds_another_run": ["--dry-run", "--logging.output_dir", str(earlier)],
        "nccl_without_gpus": [*small, "--weight_sync.backend", "nccl"],
        "dry_run_nccl_without_gpus": ["--dry-run", "--weight_sync.backend", "nccl"],
        # The docs' Megatron line without --dry-run, on a machine without GPUs (and no CPU shim).
        "megatron_without_gpus": [*megatron],
        "dry_run_megatron_without_gpus": ["--dry-run", *megatron],
        "dry_run_megatron_on_a_gpu_cluster": ["--dry-run", "--cluster", "1x4", *megatron],
        "words_the_builtin_tokenizer_cannot_encode": [
            *(*small, "--data.prompt_data", str(data / "words.jsonl")),
        ],
        "broken_json_line": [*small, "--data.prompt_data", str(data / "broken.jsonl")],
        "save_into_a_file": [*small, "--save", str(data / "a_file")],
        "megatron_load_missing_checkpoint": [*megatron, "--load", str(data / "none")],
        **{
            f"dry_run_{recipe.stem}": [
                *("--config", str(recipe), "--dry-run", "--cluster"),
                "3x8" if "24gpu" in recipe.stem else "1x8",
            ]
            for recipe in sorted((REPO / "recipes").glob("qwen3-30b-a3b*.yaml"))
        },
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def quick(data) -> dict[str, Result]:
    """name -> Result of every case that must finish without starting Ray."""
    cases = write_inputs(data)
    ray_tmp = data / "ray_tmp"
    env = cli_env(RAY_TMPDIR=str(ray_tmp))  # a started Ray would leave its session here
    if FRESH:
        results = [run_fresh(argv, env, timeout=300) for argv in cases.values()]
    else:
        results = run_forked(list(cases.values()), env, data)
    assert not ray_tmp.exists() or not any(ray_tmp.iterdir()), "a quick case started Ray"
    return dict(zip(cases, results, strict=True))


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_file", ["missing.jsonl does not exist", "data.prompt_data"]),
        ("directory", ["a_directory is not a file"]),
        ("unsupported_extension", ["prompts.csv has unsupported extension '.csv'", ".jsonl"]),
        ("row_without_input_key", ["rows.jsonl:4: no key 'prompt'", "data.input_key"]),
        ("empty_data", ["empty.jsonl holds no prompts"]),
        ("unknown_flag", ["unknown config key '--train.lrr'", "did you mean --train.lr"]),
        ("unknown_recipe_key", ["typo.yaml: unknown config key 'train.lrr'", "mean train.lr"]),
        ("reward_does_not_import", ["nosuchmodule:fn", "cannot import module 'nosuchmodule'"]),
        ("environment_does_not_import", ["rollout.environment='nosuchenv:Env'", "'nosuchenv'"]),
        ("tool_does_not_import", ["tool 'lookup'", "cannot import module 'nosuchtool'"]),
        (
            "batch_not_divisible",
            ["rollout.batch_size=250 is not divisible by rollout.samples_per_prompt=8", "248"],
        ),
        ("dry_run_layout_the_backend_cannot_run", ["train.parallel.tensor=4", "torch backend"]),
        ("output_dir_is_a_file", ["a_file is a file, not a folder", "--logging.output_dir DIR"]),
        ("output_dir_inside_a_file", ["a_file/run is inside", "a_file, which is a file"]),
        (
            "output_dir_holds_another_run",
            ["earlier_run holds another run's results (metrics.jsonl)", "--logging.overwrite true"],
        ),
        ("nccl_without_gpus", ["weight_sync.backend=nccl needs", "distinct GPUs", "auto or gloo"]),
        ("dry_run_nccl_without_gpus", ["weight_sync.backend=nccl needs"]),
        ("megatron_without_gpus", ["train.backend=megatron needs NVIDIA GPUs", "--cluster"]),
        ("dry_run_megatron_without_gpus", ["train.backend=megatron needs NVIDIA GPUs"]),
        (
            "words_the_builtin_tokenizer_cannot_encode",
            ["words.jsonl:2:", "cannot encode '3,7='", "--model.hf_checkpoint"],
        ),
        ("broken_json_line", ["broken.jsonl:2: not valid JSON", "at column 30"]),
        ("save_into_a_file", ["checkpoint.save=", "a_file is a file, not a folder", "--save DIR"]),
        ("megatron_load_missing_checkpoint", ["checkpoint.load=", "none holds no checkpoint"]),
    ],
)
def test_bad_input_is_one_error_line_and_exit_code_2(quick, case, expected):
    result = quick[case]
    line = result.error_line()
    for text in expected:
        assert text in line
    assert result.returncode == 2
    assert result.stdout == ""


def test_a_refused_output_folder_is_left_as_it_was(quick, data):
    assert quick["output_dir_holds_another_run"].returncode == 2
    earlier = data / "earlier_run"
    assert sorted(p.name for p in earlier.iterdir()) == ["metrics.jsonl"]
    assert (earlier / "metrics.jsonl").read_text().count("\n") == 1
    assert (data / "a_file").read_text() == ""


def test_a_dry_run_says_that_the_run_would_refuse_the_output_folder(quick):
    result = quick["dry_run_output_dir_holds_another_run"]
    assert result.returncode == 0, result.stderr
    assert "# the run will refuse it: logging.output_dir=" in result.stdout
    assert "--logging.overwrite true" in result.stdout


def test_every_qwen3_recipe_dry_runs_without_its_model_or_data(quick):
    recipes = sorted((REPO / "recipes").glob("qwen3-30b-a3b*.yaml"))
    assert len(recipes) >= 5
    for recipe in recipes:
        result = quick[f"dry_run_{recipe.stem}"]
        assert result.returncode == 0, (recipe.name, result.stderr)
        assert result.stderr == "", recipe.name
        # /models and /data are not on this machine: said, not refused
        assert "config.json is not readable here" in result.stdout, recipe.name
        assert "not found here; read at start-up" in result.stdout, recipe.name
        assert "/outputs/" in result.stdout and "not on a file system mounted here" in result.stdout
        assert "placement: " in result.stdout


def test_a_megatron_run_plans_on_a_gpu_cluster_from_a_machine_without_gpus(quick):
    result = quick["dry_run_megatron_on_a_gpu_cluster"]
    assert result.returncode == 0, result.stderr
    assert "placement: 4 GPUs on 1 node(s)" in result.stdout


def test_errors_name_the_full_path_of_the_file(quick, data):
    assert str(data / "rows.jsonl") + ":4" in quick["row_without_input_key"].error_line()
    assert str(data / "typo.yaml") in quick["unknown_recipe_key"].error_line()


def test_a_flag_without_a_value_is_one_error_line(quick):
    result = quick["flag_without_value"]
    assert result.returncode == 2
    assert "--num_steps" in result.error_line()


def test_an_abbreviated_key_is_rejected(quick):
    result = quick["abbreviated_flag"]
    assert result.returncode == 2
    assert "did you mean --num_steps" in result.error_line()


def test_dry_run_prints_the_resolved_config_and_the_plan(quick):
    result = quick["dry_run"]
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    config_text, _, plan = result.stdout.partition("\n\nplacement: ")
    assert yaml.safe_load(config_text) == to_dict(load_config(TINY))
    assert " node(s), " in plan.splitlines()[0]
    assert "train 0 " in plan and "engine 0 " in plan


def actor_rows(plan: str) -> list[tuple[str, int, int]]:
    """(actor, node, gpu) for each row of the placement table."""
    rows = []
    for line in plan.splitlines():
        if line.startswith(("train ", "engine ")):
            parts = line.split()
            rows.append((f"{parts[0]} {parts[1]}", int(parts[2]), int(parts[-1])))
    return rows


def test_dry_run_on_a_hypothetical_three_node_cluster(quick):
    result = quick["dry_run_3x8"]
    assert result.returncode == 0, result.stderr
    assert "placement: 24 GPUs on 3 node(s), disaggregated" in result.stdout
    rows = actor_rows(result.stdout)
    trainers = [(node, gpu) for actor, node, gpu in rows if actor.startswith("train")]
    engines = [(node, gpu) for actor, node, gpu in rows if actor.startswith("engine")]
    assert trainers == [(r // 8, r % 8) for r in range(16)]  # ranks fill nodes 0 and 1
    assert engines == [(2, gpu) for gpu in range(8)]  # the 8 engines take node 2
    assert len(set(trainers + engines)) == 24


def test_help_lists_every_config_key_with_its_doc_and_default(quick):
    result = quick["help"]
    assert result.returncode == 0, result.stderr
    compact = "".join(result.stdout.split())  # argparse re-wraps the help text
    for key, default, doc in describe_keys():
        assert f"--{key} VALUE" in result.stdout, key
        assert "".join(f"{doc} [{default}]".split()) in compact, key
    assert "--dry-run" in result.stdout and "--cluster" in result.stdout


# --- a reward that raises: only found once the engines score samples -------------------------


@pytest.fixture(scope="module")
def raising_reward(tmp_path_factory) -> tuple[Result, Path]:
    """One real run (Ray, a trainer, an engine) whose reward function raises. Its module sits
    in the job's working directory, not on PYTHONPATH: the driver and the Ray workers import it
    from there. The first evaluation scores samples, so the run fails before any step."""
    tmp = tmp_path_factory.mktemp("reward")
    (tmp / "bad_reward.py").write_text(
        "def reward(prompt, response, label):\n    raise ValueError('no answer found')\n"
    )
    out = tmp / "o"
    argv = [*SMALL, "--rollout.reward", "bad_reward:reward", "--logging.output_dir", str(out)]
    return run_fresh(argv, cli_env(), timeout=600, cwd=tmp), out


def test_a_reward_that_raises_is_one_error_line_naming_it(raising_reward):
    result, out = raising_reward
    assert result.returncode == 2, result.stderr
    line = result.error_line()  # the only line on stderr, no traceback
    assert "reward function bad_reward:reward raised ValueError: no answer found" in line
    assert f"traceback in {out / 'error.log'}" in line


def test_a_failed_start_leaves_only_its_error_log(raising_reward):
    _, out = raising_reward
    assert sorted(p.name for p in out.iterdir()) == ["error.log"]
    log = (out / "error.log").read_text()
    assert "Traceback" in log and "bad_reward.py" in log  # the user's frame is in it
