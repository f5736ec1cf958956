"""A reward function whose process is killed (SIGKILL, as the OOM killer or a lost node ends
it) in the middle of a rollout, once: when the file named by `SLUICE_TEST_KILL_TRIGGER`
appears, the first rollout actor to score a sample takes it (an atomic rename, so exactly one
does) and sends SIGKILL to its own pid. Otherwise the built-in task's reward.
`tests/test_faults.py` runs a job with it."""

import os
import signal

from tasks.digits import reward as digits_reward


def reward(prompt: str, response: str, label: str) -> float:
    trigger = os.environ.get("SLUICE_TEST_KILL_TRIGGER")
    if trigger and os.path.exists(trigger):
        try:
            os.rename(trigger, f"{trigger}.{os.getpid()}")  # the pid that was killed
        except FileNotFoundError:
            pass  # another rollout actor took it
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    return digits_reward(prompt, response, label)
