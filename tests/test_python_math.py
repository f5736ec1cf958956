"""The python-math environment (tasks/python_math.py) on a real `Episode`, the real `python`
tool in a real `ToolPool` on Ray, and a tokenizer that can write code: the model's code runs
and what it printed comes back as a masked-out tool message rendered by the chat template;
the final answer is scored by math_reward; a block that raises, is killed or hangs shows the
model the error and the episode still ends with a reward; the tool-call limit ends the loop;
a turn cut in a code block is scored as it is.

The model is a script (the engine's stand-in): it returns pre-written turns, encoded with the
tokenizer and closed by EOS, as the engine returns sampled ones.
"""

import asyncio
import json
from itertools import groupby

import pytest
import ray

from data.prompts import PromptRecord, encode_prompt, load_prompts
from rl.environments import Episode, Limits, Reply, Turn
from rl.tools import ToolPool
from tasks.python_math import (
    NO_MORE_CODE,
    NO_OUTPUT,
    SYSTEM_PROMPT,
    PythonMathEnvironment,
    code_to_run,
    main,
)
from tests.chat_tokenizer import byte_level_tokenizer

QUESTION = "What is 6 times 7?"
CODE_TURN = "I will compute it.\n```python\nprint(6 * 7)\n```"
"""A code turn whose output (42) is not in its text: seen in an observation, the tool ran it."""
LIMITS = Limits(max_turns=8, max_tokens=4096, max_tool_calls=4, max_new_tokens=512)

TOKENIZER = byte_level_tokenizer()


class ScriptedModel:
    """The episode's generate function: turn i is `turns[i]`, closed by EOS (finish `stop`),
    or cut at max_new_tokens (finish `length`), as the engine cuts a turn. Keeps the context
    each turn was asked on; a turn past the script fails the test."""

    def __init__(self, turns: list[str]):
        self.turns = turns
        self.contexts: list[list[int]] = []

    async def __call__(self, token_ids: list[int], max_new_tokens: int) -> Turn:
        text = self.turns[len(self.contexts)]
        self.contexts.append(list(token_ids))
        ids = [*TOKENIZER.encode(text, add_special_tokens=False), TOKENIZER.eos_token_id]
        finish = "stop" if len(ids) <= max_new_tokens else "length"
        ids = ids[:max_new_tokens]
        return Turn(ids, [-0.5] * len(ids), finish)


@pytest.fixture(scope="module")
def tools():
    """The real python tool: a tool actor on real Ray, a call limit well above a run's."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    pool = ToolPool({"python": "rl.tools:python"}, workers=1, timeout_s=30.0, memory_mb=512)
    yield pool
    pool.close()
    ray.shutdown()


def play(turns: list[str], tools, limits: Limits = LIMITS) -> tuple[float, Episode, ScriptedModel]:
    """One episode of the environment on the scripted turns: (reward, episode, model)."""
    record = PromptRecord(QUESTION, "42", "test", ({"role": "user", "content": QUESTION},))
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, *record.messages]
    prompt_ids = encode_prompt(TOKENIZER, messages, apply_chat_template=True)
    model = ScriptedModel(turns)
    episode = Episode(record, prompt_ids, TOKENIZER, limits, model, tools)
    reward = asyncio.run(PythonMathEnvironment().run(episode))
    return reward, episode, model


def observations(episode: Episode) -> list[str]:
    """The text of each run of observation tokens (loss mask 0), special tokens kept."""
    pairs = zip(episode.response_ids, episode.loss_mask, strict=True)
    runs = groupby(pairs, key=lambda pair: pair[1])
    return [TOKENIZER.decode([token for token, _ in run]) for mask, run in runs if mask == 0]


def tool_message(output: str) -> str:
    """What the chat template makes of a tool message after the model's turn (the newline
    ChatML writes after its `<|im_end|>`), with the next turn's opening."""
    return f"\n<|im_start|>tool\n{output}<|im_end|>\n<|im_start|>assistant\n"


def test_the_tokenizer_round_trips_code_and_latex():
    text = "```python\nprint(x**2)  # ∑ é\n```\nSo \\boxed{\\frac{1}{2}}."
    assert TOKENIZER.decode(TOKENIZER.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize(("answer", "reward"), [("\\boxed{42}", 1.0), ("\\boxed{41}", 0.0)])
def test_the_models_code_runs_and_its_output_is_read_not_trained(tools, answer, reward):
    answer_turn = f"So the product is {answer}."
    got, episode, model = play([CODE_TURN, answer_turn], tools)
    assert got == reward

    assert observations(episode) == [tool_message("42\n")]  # print(6 * 7)'s output
    code_ids = [*TOKENIZER.encode(CODE_TURN, add_special_tokens=False), TOKENIZER.eos_token_id]
    answer_ids = TOKENIZER.encode(answer_turn, add_special_tokens=False)
    observed = TOKENIZER.encode(tool_message("42\n"), add_special_tokens=False)
    answer_ids += [TOKENIZER.eos_token_id]
    assert episode.response_ids == code_ids + observed + answer_ids
    assert episode.loss_mask == [1] * len(code_ids) + [0] * len(observed) + [1] * len(answer_ids)
    # The answer turn was generated on the prompt, the code turn and the tool's output.
    assert model.contexts[1] == episode.prompt_ids + code_ids + observed
    assert (episode.counts.turns, episode.counts.tool_calls, episode.end_reason) == (2, 1, None)


@pytest.mark.parametrize(
    ("code", "shown"),
    [
        ("print(1 / 0)", "\nZeroDivisionError: division by zero\n\n[exit code 1]"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "\n[exit code -9]"),
        ("print('searching', flush=True)\nwhile True: pass", "tool 'python' timed out after 2 s"),
        ("x = 6 * 7", NO_OUTPUT),
    ],
    ids=["raises", "killed", "hangs", "prints-nothing"],
)
def test_a_failed_run_is_shown_to_the_model_and_the_episode_still_ends_scored(tools, code, shown):
    short = ToolPool({"python": "rl.tools:python"}, workers=1, timeout_s=2.0, memory_mb=512)
    turns = [f"```python\n{code}\n```", "It failed; by hand, 6 * 7 = \\boxed{42}."]
    reward, episode, _ = play(turns, short)
    (observation,) = observations(episode)
    assert observation.startswith("\n<|im_start|>tool\n")
    assert observation.endswith(tool_message(shown).removeprefix("\n<|im_start|>tool\n"))
    assert reward == 1.0
    assert episode.counts.tool_errors == (1 if "timed out" in shown else 0)
    short.close()


def test_the_tool_call_limit_ends_the_loop(tools):
    """Two runs; the third block is not run and the model is told; its next turn is the
    answer whatever it holds (here code too), and no turn follows."""
    turns = [f"```python\nprint({n})\n```" for n in (101, 102, 103)]
    turns += ["```python\nprint(104)\n```\n\\boxed{42}", "\\boxed{0}"]
    limits = Limits(max_turns=8, max_tokens=4096, max_tool_calls=2, max_new_tokens=512)
    reward, episode, model = play(turns, tools, limits)
    assert observations(episode) == [
        tool_message("101\n"),
        tool_message("102\n"),
        tool_message(NO_MORE_CODE),
    ]
    assert len(model.contexts) == 4
    assert reward == 1.0  # the fourth turn's \boxed{42}
    assert (episode.counts.tool_calls, episode.end_reason) == (2, "max_tool_calls")


def test_a_turn_cut_in_a_code_block_is_scored_as_it_is(tools):
    text = "It is \\boxed{42}; to check:\n```python\nprint(6 * 7)\n```"
    cut = len(TOKENIZER.encode(text[: text.index("print")], add_special_tokens=False))
    limits = Limits(max_turns=8, max_tokens=4096, max_tool_calls=4, max_new_tokens=cut)
    reward, episode, model = play([text, "\\boxed{0}"], tools, limits)
    assert episode.last_turn.finish_reason == "length"
    assert (len(model.contexts), episode.counts.tool_calls, reward) == (1, 0, 1.0)


def test_running_out_of_turns_after_a_run_scores_the_empty_reply(tools):
    limits = Limits(max_turns=1, max_tokens=4096, max_tool_calls=4, max_new_tokens=512)
    reward, episode, _ = play([CODE_TURN], tools, limits)
    assert (reward, episode.end_reason, episode.counts.tool_calls) == (0.0, "max_turns", 1)


@pytest.mark.parametrize(
    ("text", "finish", "code"),
    [
        ("```python\nprint(1)\n```", "stop", "print(1)\n"),
        ("```python\na = 1\n```\nthen\n```python\nprint(2)\n```", "stop", "print(2)\n"),
        ("<think>\n```python\nprint(1)\n```\n</think>\n\n\\boxed{1}", "stop", None),
        ("<think>try it</think>\n```python\nprint(3)\n```", "stop", "print(3)\n"),
        ("```python\nprint(1)\n```", "length", None),
        ("```python\nprint(1)", "stop", None),
        ("", "limit", None),
    ],
    ids=["one", "the-last", "in-thinking", "after-thinking", "cut", "unclosed", "limit"],
)
def test_which_code_a_turn_asks_to_run(text, finish, code):
    assert code_to_run(Reply([], text, finish)) == code


def test_the_system_prompt_is_added_to_a_prompt_file(tmp_path):
    rows = [
        {"prompt": "What is 1 + 1?", "label": "2"},
        {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "label": 4},
    ]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    main(str(source), str(target))
    records = load_prompts(str(target), "prompt", "label")
    assert [r.messages[0] for r in records] == [{"role": "system", "content": SYSTEM_PROMPT}] * 2
    assert [(r.text, r.label) for r in records] == [
        ("What is 1 + 1?", "2"),
        ("What is 2 + 2?", "4"),
    ]
