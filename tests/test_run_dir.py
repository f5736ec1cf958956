"""The output folder's life cycle (tracking/run_dir.py, tracking/metrics.py) and the one-line
account of a failed run (actors/failures.py), without Ray: the CLI tests run them end to end."""

import json
import traceback

import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from actors.failures import report
from config.errors import UserError
from tracking.metrics import MetricsWriter
from tracking.run_dir import check_not_another_run, check_writable_folder


def earlier_run(folder):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "x": s}) + "\n" for s in (1, 2, 3))
    )
    (folder / "summary.json").write_text('{"steps": 3}')
    (folder / "notes.txt").write_text("mine")  # not a run's file: always kept
    (folder / "tensorboard").mkdir()
    return folder


def test_a_folder_with_another_run_is_refused_unless_overwritten_or_resumed(tmp_path):
    folder = earlier_run(tmp_path / "run")
    with pytest.raises(UserError, match=r"holds another run's results \(metrics.jsonl, summary"):
        check_not_another_run(folder, overwrite=False, resuming=False)
    check_not_another_run(folder, overwrite=True, resuming=False)
    check_not_another_run(folder, overwrite=False, resuming=True)
    check_not_another_run(tmp_path / "new" / "run", overwrite=False, resuming=False)
    check_writable_folder(tmp_path / "new" / "run", "logging.output_dir", "--logging.output_dir")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")  # a run that never logged a step
    check_not_another_run(tmp_path / "empty", overwrite=False, resuming=False)


def test_nothing_is_written_before_the_first_metrics(tmp_path):
    writer = MetricsWriter(tmp_path / "run", config_text="{}")
    writer.rewind(0)  # a restart before any step: still nothing
    writer.close()
    assert not (tmp_path / "run").exists()


def test_overwrite_replaces_the_earlier_run_only_at_the_first_write(tmp_path):
    folder = earlier_run(tmp_path / "run")
    writer = MetricsWriter(folder, config_text='{"seed": 1}', replace=True)
    assert (folder / "summary.json").exists()  # a run that fails now loses nothing
    writer.write(1, {"y": 0.5})
    writer.close()
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "metrics.jsonl", "notes.txt", "tensorboard",
    ]  # fmt: skip
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "y": 0.5}]
    assert json.loads((folder / "config.json").read_text()) == {"seed": 1}


def test_a_resumed_run_continues_the_metrics_from_its_checkpoint_step(tmp_path):
    folder = earlier_run(tmp_path / "run")
    writer = MetricsWriter(folder, config_text="{}", resume_step=2)
    writer.write(3, {"x": 30})
    writer.close()
    steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps == [{"step": 1, "x": 1}, {"step": 2, "x": 2}, {"step": 3, "x": 30}]
    assert (folder / "summary.json").exists()  # rewritten when the resumed run ends


def raised(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:
        return caught


def test_an_actor_error_is_one_line_and_its_traceback_goes_to_error_log(tmp_path):
    cause = raised(ValueError("bad shape\nsecond line"))
    remote = RayTaskError(
        "RolloutActor.generate", "".join(traceback.format_exception(cause)), cause
    )
    failure = report(remote, tmp_path / "run")
    assert failure.exit_code == 1
    assert failure.line == (
        f"ValueError: bad shape (in RolloutActor.generate) "
        f"(traceback in {tmp_path / 'run' / 'error.log'})"
    )
    assert "second line" in (tmp_path / "run" / "error.log").read_text()


def test_a_users_mistake_inside_an_actor_exits_2_with_its_own_message(tmp_path):
    cause = raised(UserError("reward function m:f raised KeyError: 'x'"))
    remote = RayTaskError("RolloutActor.generate", "remote traceback", cause).as_instanceof_cause()
    failure = report(remote, tmp_path)
    assert failure.exit_code == 2
    assert failure.line.startswith("reward function m:f raised KeyError: 'x' (traceback in ")
    assert (tmp_path / "error.log").exists()


def test_a_mistake_found_before_the_start_writes_nothing(tmp_path):
    failure = report(UserError("data.prompt_data=x does not exist"), tmp_path / "run")
    assert failure == type(failure)("data.prompt_data=x does not exist", 2)
    assert not (tmp_path / "run").exists()


def test_a_dead_actor_is_one_line_however_long_rays_message(tmp_path):
    died = ActorDiedError()  # Ray's many-line message of an actor that died mid-task
    failure = report(died, tmp_path)
    assert failure.exit_code == 1
    assert "\n" not in failure.line
    assert failure.line.startswith("ActorDiedError: The actor died")
    assert (tmp_path / "error.log").exists()


def test_a_run_stopped_before_its_first_step_takes_the_folder_for_its_summary(tmp_path):
    folder = earlier_run(tmp_path / "run")
    writer = MetricsWriter(folder, config_text='{"seed": 2}', replace=True)
    writer.begin()  # what Driver.run does before writing summary.json
    writer.begin()  # idempotent
    writer.close()
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "metrics.jsonl", "notes.txt", "tensorboard",
    ]  # fmt: skip
    assert (folder / "metrics.jsonl").read_text() == ""  # the earlier run's steps are gone
