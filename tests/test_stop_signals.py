"""Ctrl-C and `ray job stop` on a running job, as a user sends them.

The driver runs as `python driver.py` in its own process (with its own local Ray cluster);
once its first step is logged, the test sends SIGINT twice (what `uv run` and a terminal
deliver together) or SIGTERM once (what `ray job stop` sends). The run must finish its step,
save a checkpoint, exit 130 / 143 with one line and no traceback, and leave none of its
processes (Ray's included) behind.
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

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("signals", "code"),
    [((signal.SIGINT, signal.SIGINT), 130), ((signal.SIGTERM,), 143)],
    ids=["sigint-twice", "sigterm"],
)
def test_a_stop_signal_ends_the_run_after_its_step_with_a_checkpoint(tmp_path, signals, code):
    out, checkpoints, errors = tmp_path / "run", tmp_path / "ckpt", tmp_path / "stderr.txt"
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    command = [
        sys.executable, "driver.py", "--num_steps", "1000", "--logging.eval_every", "0",
        "--logging.progress_bar", "false", "--logging.output_dir", str(out),
        "--save", str(checkpoints), "--train.num_workers", "1", "--rollout.num_engines", "1",
    ]  # fmt: skip
    with errors.open("w") as stderr:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        try:
            for line in proc.stdout:
                if line.startswith("step 1/1000"):
                    break
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
