"""A phase that never finishes ends the run with its name, its actors' stacks and exit 1.

The job's reward function hangs after some calls (`tests/stuck_reward.py`), inside a step's
rollout; with `timeouts.rollout_s` short (10 s: a step's rollout of this job takes a few
hundredths of a second), the driver must name the phase, the step and the rollout actor,
leave py-spy's dump of that actor's stack (showing the reward that hangs) in the output
folder, kill that actor at once (no wait for a shutdown it cannot reach), and exit 1 with one
`error:` line, not hang.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_stuck_rollout_is_named_with_its_stack_and_the_run_exits(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    command = [
        sys.executable, "driver.py", "--rollout.reward", "tests.stuck_reward:reward",
        "--timeouts.rollout_s", "10", "--train.num_workers", "1", "--rollout.num_engines", "1",
        "--logging.progress_bar", "false", "--logging.output_dir", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    bound = r"rollout of step (\d+) did not finish within timeouts.rollout_s=10 s"
    match = re.search(bound, errors[0])
    assert match, errors[0]
    assert re.search(r"still running: sluice-rollout-0 \(pid \d+\);", errors[0]), errors[0]
    assert "Traceback" not in done.stderr
    # The stuck actor is killed at once, not after waiting for a shutdown it never reaches.
    assert "did not shut down" not in done.stderr, done.stderr[-3000:]
    stack = out / "stuck" / f"step{match.group(1)}-rollout" / "sluice-rollout-0.txt"
    assert "wait_for_a_verifier_that_never_answers" in stack.read_text()
