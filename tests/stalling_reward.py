"""A reward function that stalls once, on cue, as a slow verifier can: when the file named by
`SLUICE_TEST_STALL_TRIGGER` appears, the first call to see it takes it (an atomic rename to
`<trigger>.taken`, so exactly one call does) and sleeps `SLUICE_TEST_STALL_S` seconds before
scoring. Otherwise the built-in task's reward. A test that sees `<trigger>.taken` knows the
run is inside a step's rollout. `tests/test_stop_signals.py` and `tests/test_job_submit.py`
run jobs with it."""

import os
import time

from tasks.digits import reward as digits_reward


def reward(prompt: str, response: str, label: str) -> float:
    trigger = os.environ.get("SLUICE_TEST_STALL_TRIGGER")
    if trigger and os.path.exists(trigger):
        try:
            os.rename(trigger, f"{trigger}.taken")
        except FileNotFoundError:
            pass  # another call took it
        else:
            time.sleep(float(os.environ["SLUICE_TEST_STALL_S"]))
    return digits_reward(prompt, response, label)
