"""The built-in synthetic task: recall the first of four digits.

Prompt `7 2 9 4 =`, answer `7` followed by end-of-sequence. A random-init model answers at
chance (about 1 in 10 greedy answers right); it can learn the task by RL alone in a few dozen
steps because the reward is dense enough: a right first digit earns half the reward, the exact
answer (digit then stop) all of it. Held-out prompts are digit strings never seen in training,
so evaluation measures the rule, not memorised prompts.
"""

import random

from data.prompts import PromptRecord

NUM_DIGITS = 4
HELD_OUT = 256


def make_prompts(seed: int) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(train, held-out) prompt records; disjoint digit strings, deterministic in `seed`."""
    rng = random.Random(seed)
    strings = [tuple(rng.randrange(10) for _ in range(NUM_DIGITS)) for _ in range(10**NUM_DIGITS)]
    unique = list(dict.fromkeys(strings))
    rng.shuffle(unique)
    records = [
        PromptRecord(
            text=" ".join(map(str, digits)) + " =",
            label=str(digits[0]),
            source=f"builtin:digits#{index}",
        )
        for index, digits in enumerate(unique)
    ]
    return records[HELD_OUT:], records[:HELD_OUT]


def reward(prompt: str, response: str, label: str) -> float:
    """1.0 for exactly the label, 0.5 when the response starts with it, else 0.0."""
    words = response.split()
    if words == [label]:
        return 1.0
    if words and words[0] == label:
        return 0.5
    return 0.0
