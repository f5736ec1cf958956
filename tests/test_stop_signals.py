"""Ctrl-C and SIGTERM on a running job, as a user sends them.

The driver runs as `python driver.py` in its own process (with its own local Ray cluster);
once its first step is logged, the test sends SIGINT twice (what `uv run` without a terminal
delivers for one signal to its process group) or SIGTERM once (what `ray job stop` sends;
tests/test_job_submit.py stops a real job). The run must finish its step, save a checkpoint,
exit 130 / 143 with one line and no traceback, and leave none of its processes (Ray's
included) behind. Three SIGINTs within the window force the stop of a run that hangs (its
reward stalls, tests/stalling_reward.py): exit 130 at once, same cleanliness.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from actors.stopping import job_stop_wait_notice, job_stop_wait_s
from config.schema import TimeoutsConfig

ROOT = Path(__file__).resolve().parent.parent


def start_driver(out: Path, checkpoints: Path, stderr, *extra: str, env: dict | None = None):
    """`python driver.py` of a long tiny run in its own process, with its own local Ray."""
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    command = [
        sys.executable, "driver.py", "--num_steps", "1000", "--logging.eval_every", "0",
        "--logging.progress_bar", "false", "--logging.output_dir", str(out),
        "--save", str(checkpoints), "--train.num_workers", "1", "--rollout.num_engines", "1",
        *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
    )


def still_running(family: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of `family` still running after up to `timeout` seconds. A zombie has ended: a
    process whose parent died first is re-parented to PID 1, which not every container reaps."""
    deadline = time.monotonic() + timeout
    while True:
        running = []
        for process in family:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    running.append(process)
            except psutil.NoSuchProcess:
                pass
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.2)


def wait_for_step_one(proc: subprocess.Popen) -> None:
    for line in proc.stdout:
        if line.startswith("step 1/1000"):
            return
    raise AssertionError(f"the driver exited ({proc.wait()}) before its first step")


@pytest.mark.parametrize(
    ("signals", "code"),
    [((signal.SIGINT, signal.SIGINT), 130), ((signal.SIGTERM,), 143)],
    ids=["sigint-twice", "sigterm"],
)
def test_a_stop_signal_ends_the_run_after_its_step_with_a_checkpoint(tmp_path, signals, code):
    out, checkpoints, errors = tmp_path / "run", tmp_path / "ckpt", tmp_path / "stderr.txt"
    with errors.open("w") as stderr:
        proc = start_driver(out, checkpoints, stderr)
        try:
            wait_for_step_one(proc)
            family = psutil.Process(proc.pid).children(recursive=True)
            assert family, "Ray's processes should be the driver's children"
            for sent in signals:
                proc.send_signal(sent)
                time.sleep(0.2)
            rest, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == code
    stderr_text = errors.read_text()
    assert stderr_text.count("received: stopping after the current step") == 1, stderr_text
    assert "Traceback" not in stderr_text, stderr_text
    summary = json.loads(rest.strip().splitlines()[-1])
    assert summary["stopped_by"] == signal.Signals(signals[0]).name
    assert 1 <= summary["steps"] < 1000
    tracker = checkpoints / "latest_checkpointed_iteration.txt"
    assert int(tracker.read_text()) == summary["steps"]  # the last finished step is saved
    assert json.loads((out / "summary.json").read_text()) == summary
    _, alive = psutil.wait_procs(family, timeout=60)
    assert not alive, [p.pid for p in alive]


def test_a_third_sigint_within_the_window_forces_the_stop_of_a_hung_run(tmp_path):
    """The clean stop would wait for the stalled reward (10 minutes, its phase's bound is an
    hour); the third SIGINT ends the run at once."""
    out, checkpoints, errors = tmp_path / "run", tmp_path / "ckpt", tmp_path / "stderr.txt"
    trigger = tmp_path / "stall"
    stall = {"SLUICE_TEST_STALL_TRIGGER": str(trigger), "SLUICE_TEST_STALL_S": "600"}
    reward = ("--rollout.reward", "tests.stalling_reward:reward")
    with errors.open("w") as stderr:
        proc = start_driver(out, checkpoints, stderr, *reward, env=stall)
        try:
            wait_for_step_one(proc)
            trigger.touch()
            deadline = time.monotonic() + 120
            while not Path(f"{trigger}.taken").exists():  # a reward of a step is stalled now
                assert time.monotonic() < deadline and proc.poll() is None, "never stalled"
                time.sleep(0.1)
            family = psutil.Process(proc.pid).children(recursive=True)
            for _ in range(3):
                proc.send_signal(signal.SIGINT)
                time.sleep(0.2)
            sent = time.monotonic()
            proc.wait(timeout=30)
            waited = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130
    stderr_text = errors.read_text()
    assert stderr_text.count("received: stopping after the current step") == 1, stderr_text
    assert stderr_text.count("3 stop signals within 5 s: forced stop") == 1, stderr_text
    assert "Traceback" not in stderr_text, stderr_text
    assert waited < 10, f"the forced stop took {waited:.1f} s"
    assert not (out / "summary.json").exists()  # the step never finished
    alive = still_running(family, timeout=60)
    assert not alive, [p.pid for p in alive]


def test_a_job_whose_stop_wait_is_too_short_is_warned_at_start_up():
    """Ray's job supervisor SIGKILLs the driver RAY_JOB_STOP_WAIT_TIME_S after SIGTERM: the
    driver of a job says so when that cannot cover a step, a save and the shutdown."""
    timeouts = TimeoutsConfig(rollout_s=100, train_s=50, sync_s=20, save_s=30)
    needed = 2 * 100 + 50 + 20 + 30 + 60
    assert job_stop_wait_s(timeouts, shutdown_s=60) == needed
    job = {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}  # what the supervisor gives a job's driver
    default = job_stop_wait_notice(timeouts, 60, job)
    assert "RAY_JOB_STOP_WAIT_TIME_S=3 s (Ray's default)" in default
    fix = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(needed)}})
    assert f"--runtime-env-json '{fix}'" in default

    def notice(wait: str) -> str | None:
        return job_stop_wait_notice(timeouts, 60, {**job, "RAY_JOB_STOP_WAIT_TIME_S": wait})

    assert f"RAY_JOB_STOP_WAIT_TIME_S={needed - 1} s after" in notice(str(needed - 1))
    assert "RAY_JOB_STOP_WAIT_TIME_S='1e4' (not an integer)" in notice("1e4")  # Ray's int()
    assert notice(str(needed)) is None
    assert job_stop_wait_notice(timeouts, 60, {}) is None  # not a job: Ctrl-C has no deadline
