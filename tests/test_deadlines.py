"""A phase that never finishes and cannot be routed around ends the run with its name, its
actors' stacks and exit 1.

The job's only rollout actor wedges in its first step's generation (the fault point
`rollout.generate`, armed with `hang`: `actors/fault_points.py`), and Ray may not restart it
(`rollout.max_restarts 0`). With `timeouts.rollout_s` short (10 s: a step's rollout of this job
takes a few hundredths of a second), the driver must kill the wedged actor, find no engine left
to give its prompt groups to, name the phase, the step and the actor, leave py-spy's dump of
that actor's stack (showing where it hangs) in the output folder, and exit 1 with one `error:`
line, not hang. (An engine wedged beside a live one costs only itself: tests/test_faults.py.)
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from actors.fault_points import FAULT_DIR_ENV, arm

ROOT = Path(__file__).resolve().parent.parent


def test_a_stuck_rollout_is_named_with_its_stack_and_the_run_exits(tmp_path):
    out, faults = tmp_path / "run", tmp_path / "faults"
    faults.mkdir()
    arm(faults, "rollout.generate", "hang")
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", FAULT_DIR_ENV: str(faults)}
    env.pop("RAY_ADDRESS", None)
    command = [
        sys.executable, "driver.py", "--timeouts.rollout_s", "10", "--rollout.max_restarts", "0",
        "--train.num_workers", "1", "--rollout.num_engines", "1",
        "--logging.progress_bar", "false", "--logging.output_dir", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert re.search(r"rollout of step 1 did not finish within timeouts.rollout_s=10 s", errors[0])
    assert re.search(r"still running: sluice-rollout-0 \(pid \d+\);", errors[0]), errors[0]
    assert "no rollout actor is left" in errors[0], errors[0]
    assert "Traceback" not in done.stderr
    # The stuck actor is killed at once, not after waiting for a shutdown it never reaches.
    assert "did not shut down" not in done.stderr, done.stderr[-3000:]
    stack = out / "stuck" / "step1-rollout" / "sluice-rollout-0.txt"
    assert "fault_points.py" in stack.read_text()
