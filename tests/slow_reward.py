"""The built-in task's reward, 4 ms slower per sample (as a remote verifier is): a step's
generation then outlasts a training step of the tiny recipe, so generations running ahead
are still running when the weights change. `tests/test_partial_rollout.py` runs a job with it."""

import time

from tasks.digits import reward as digits_reward


def reward(prompt: str, response: str, label: str) -> float:
    time.sleep(0.004)
    return digits_reward(prompt, response, label)
