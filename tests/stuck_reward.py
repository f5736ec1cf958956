"""A reward function that hangs, as one calling a remote verifier that never answers can: the
built-in task's reward for its first `ANSWERED` calls in a process, then a sleep without end.
`tests/test_deadlines.py` runs a job with it."""

import time

from tasks.digits import reward as digits_reward

ANSWERED = 150
"""Enough for the first evaluation and a first step of the small job, so the hang comes in a
step's rollout."""

calls = 0


def reward(prompt: str, response: str, label: str) -> float:
    global calls
    calls += 1
    if calls > ANSWERED:
        wait_for_a_verifier_that_never_answers()
    return digits_reward(prompt, response, label)


def wait_for_a_verifier_that_never_answers() -> None:
    while True:
        time.sleep(1)
