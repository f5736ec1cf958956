"""Tracking backends (tracking/backends.py): TensorBoard, W&B (offline: no network) and MLflow
(a file store) get the same keys at the same steps; a run resumed from a checkpoint continues
the same W&B run (same id) and the same MLflow run; wandb and mlflow stay unimported unless
chosen. The tracking module is called directly with the metrics the loop writes (no Ray)."""

import glob
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import driver
from config.schema import LoggingConfig
from tracking.backends import make_backends, mlflow_key
from tracking.metrics import MetricsWriter

REPO = Path(__file__).resolve().parent.parent


def step_metrics(step: int, salt: float) -> dict:
    """Numbers shaped like the loop's: floats, ints, a bool, a NaN (never charted)."""
    return {
        "rollout/reward_mean": 0.1 * step + salt,
        "train/loss": -0.01 * step - salt,
        "rollout/tokens": 100 + step,
        "fault/engine_restarts": 0,
        "mismatch/logprob_abs_diff_mean": float("nan"),
        "weight_version": step,
    }


EVAL = {"eval/accuracy": 0.25, "eval/aime/pass@4": 0.5, "eval/aime/avg@4": 0.125}


def write_run(out: Path, settings: LoggingConfig, steps: range, resume_step=None, salt=0.0):
    writer = MetricsWriter(
        out,
        '{"seed": 1}',
        resume_step=resume_step,
        backends=make_backends(settings, out, '{"seed": 1}'),
    )
    if resume_step is None:
        writer.write(0, EVAL)
    for step in steps:
        writer.write(step, step_metrics(step, salt))
    writer.close()


def tensorboard_scalars(out: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    return {(k, e.step): e.value for k in events.Tags()["scalars"] for e in events.Scalars(k)}


def wandb_records(path: str) -> list:
    """The records of an offline run's `.wandb` file: W&B's LevelDB-style log (a 7-byte file
    header, 32 KiB blocks of chunks with a 7-byte header: crc, length, type full/first/middle/
    last), each record a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_run(run_dir: str) -> tuple[str, dict[tuple[str, int], float]]:
    """(run id, {(key, step): value}) of one offline run directory."""
    (path,) = glob.glob(f"{run_dir}/run-*.wandb")
    run_id, scalars = None, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            # A key with slashes is kept as its parts (`nested_key`).
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            for key, value in row.items():
                if not key.startswith("_") and key != "step":
                    scalars[(key, row["step"])] = value
    return run_id, scalars


def test_wandb_and_mlflow_get_what_tensorboard_gets_and_a_resumed_run_continues_them(
    tmp_path, monkeypatch
):
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    settings = LoggingConfig(
        output_dir=str(out),
        backends=["tensorboard", "wandb", "mlflow"],
        wandb_mode="offline",
        wandb_group="g",
    )
    write_run(out, settings, range(1, 4))  # steps 1..3, then "stopped"
    write_run(out, settings, range(3, 5), resume_step=2, salt=1.0)  # resumed at step 2's save

    # TensorBoard: the resumed run's step 3 replaced the first run's.
    expected = tensorboard_scalars(out)
    assert expected[("train/loss", 3)] == pytest.approx(-1.03)
    assert not any(k == "mismatch/logprob_abs_diff_mean" for k, _ in expected)
    assert len(expected) == 3 + 5 * 4  # the evaluation's 3 keys, 5 numbers at steps 1..4

    # W&B: two offline directories (one per process) of one run id; together the same
    # numbers, the later one's step 3 last.
    first, second = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    first_id, first_scalars = wandb_run(first)
    second_id, second_scalars = wandb_run(second)
    assert first_id == second_id == json.loads((out / "tracking.json").read_text())["wandb"]
    assert {step for _, step in second_scalars} == {3, 4}
    assert {**first_scalars, **second_scalars} == pytest.approx(expected)

    # MLflow: one run in the file store; each key's latest value per step is TensorBoard's.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("sluice")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == json.loads((out / "tracking.json").read_text())["mlflow"]
    assert run.info.status == "FINISHED"
    logged = {}
    for key in {k for k, _ in expected}:
        for m in sorted(
            client.get_metric_history(run.info.run_id, mlflow_key(key)), key=lambda m: m.timestamp
        ):
            logged[(key, m.step)] = m.value
    assert logged == pytest.approx(expected)
    assert mlflow_key("eval/aime/pass@4") == "eval/aime/pass_at_4"


def test_a_fresh_run_starts_new_tracking_runs(tmp_path, monkeypatch):
    """Only a resumed run reuses tracking.json's ids; a new run in the folder gets new ones."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "run"
    settings = LoggingConfig(output_dir=str(out), backends=["mlflow"])
    write_run(out, settings, range(1, 2))
    first = json.loads((out / "tracking.json").read_text())["mlflow"]
    write_run(out, settings, range(1, 2))
    assert json.loads((out / "tracking.json").read_text())["mlflow"] != first
    assert not (out / "tensorboard").exists()  # not among the backends


def test_wandb_and_mlflow_are_imported_only_when_chosen():
    code = (
        "import sys, driver, actors.loop, actors.rollout_actor, actors.train_actor\n"
        "from pathlib import Path\n"
        "from config.schema import LoggingConfig\n"
        "from tracking.backends import make_backends\n"
        "make_backends(LoggingConfig(backends=['tensorboard', 'wandb', 'mlflow']), Path('x'))\n"
        "print(sorted(m for m in ('wandb', 'mlflow') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_slime_wandb_flags_set_the_logging_keys():
    config, _ = driver.parse_args(
        [
            "--use-wandb",
            "--wandb-project",
            "p",
            "--wandb-group",
            "g",
            "--wandb-run-id",
            "r1",
            "--wandb-mode",
            "offline",
            "--wandb-team",
            "t",
            "--wandb-dir",
            "/tmp/w",
        ]
    )
    c = config.logging
    assert c.backends == ["tensorboard", "wandb"]
    assert (c.wandb_project, c.wandb_group, c.wandb_run_id) == ("p", "g", "r1")
    assert (c.wandb_mode, c.wandb_team, c.wandb_dir) == ("offline", "t", "/tmp/w")
    both, _ = driver.parse_args(["--logging.backends", "tensorboard,wandb,mlflow"])
    assert both.logging.backends == ["tensorboard", "wandb", "mlflow"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--wandb-key", "k"], "WANDB_API_KEY"),
        (["--wandb-project", "p"], "logging.wandb_project is set but logging.backends"),
        (["--logging.mlflow_experiment", "e"], "has no mlflow"),
        (["--logging.backends", "tensorboard,comet"], "each of tensorboard, wandb, mlflow"),
        (["--wandb-mode", "sometimes", "--use-wandb"], "logging.wandb_mode"),
    ],
)
def test_bad_tracking_settings_are_refused(capsys, argv, says):
    assert driver.main(argv) == 2
    assert says in capsys.readouterr().err
