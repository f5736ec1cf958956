"""The built-in tool task: look a key up in a table only the tool can read.

Prompt `4 7` (a two-digit key); the answer is the digit the `lookup` tool returns for that key,
from a table drawn at random: a model that answers without the tool is right one time in ten
at best, whatever it learns. An episode, in the built-in model's own words:

    prompt  4 7
    turn 1  <eos>           no answer (no word: <eos>, <pad> or <bos>) asks for the tool
    tool    9 =             the tool's answer, then `=` to ask for the model's (mask 0)
    turn 2  9               the model's answer

Each turn is one token. A first turn with a word is a guess at the answer, and the episode
ends with reward 0 (even a lucky guess). Reward: 1.0 for the right digit after calling the
tool, else 0. Held-out keys' answers cannot have been learned from training keys, so held-out
accuracy above chance (0.1) proves that the tool's answer reached the model through the
observation tokens, and learning to 1.0 that the model's own tokens of both turns were trained.

Why this shape, for a model of 150k parameters: the answer turn reads like the digits task (a
digit to recall, then `=`), and the call is a token the answer never uses. Calling with `=`
and answering right after the tool's digit taught the model to say `=` or one favourite digit
in its answer (every token of an episode shares its reward). Rewarding a right guess (0.4, an
earlier version) let some seeds memorize the 80 training keys' answers instead of calling the
tool (seeds 1 and 2: held-out accuracy 0.0 and 0.25 after 80 steps); without it every seed
tried learned the tool path.
"""

import random

from data.prompts import PromptRecord
from rl.environments import Episode

HELD_OUT = 20
TABLE_SEED = 1234
"""The table is the task's, not the run's: the same for every run seed."""

ASK_MARKER = "="


def table() -> dict[str, str]:
    """Every key's value, a digit at random (what only the tool knows): each digit is the
    value of ten keys, so that the answer's every digit is as often to be learned."""
    values = [str(digit) for digit in range(10) for _ in range(10)]
    random.Random(TABLE_SEED).shuffle(values)
    keys = [f"{a} {b}" for a in range(10) for b in range(10)]
    return dict(zip(keys, values, strict=True))


def make_prompts(seed: int) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(train, held-out) prompt records: disjoint keys, deterministic in `seed`."""
    keys = list(table())
    random.Random(seed).shuffle(keys)
    records = [
        PromptRecord(text=key, label=table()[key], source=f"builtin:lookup#{index}")
        for index, key in enumerate(keys)
    ]
    return records[HELD_OUT:], records[:HELD_OUT]


def lookup(key: str) -> str:
    """The tool: the table's digit for `key` (two digits separated by a space)."""
    values = table()
    if key not in values:
        raise KeyError(f"no such key {key!r}; keys are two digits, e.g. '4 7'")
    return values[key]


class LookupEnvironment:
    """Up to two model turns: a tool call (an empty turn), then the answer (see the module)."""

    async def run(self, episode: Episode) -> float:
        first = await episode.generate(max_new_tokens=1)
        if first.text:  # a digit (or `=`): an answer without the tool, never rewarded
            return 0.0
        result = await episode.call_tool("lookup", key=episode.record.text)
        episode.observe(f"{result.output} {ASK_MARKER}")
        answer = await episode.generate(max_new_tokens=1)
        return answer_score(answer.text, episode.record.label)


def answer_score(text: str, label: str) -> float:
    return 1.0 if text.strip() == label else 0.0
