"""Math with a Python tool, for chat models (Qwen3): the model may run code before it answers.

The protocol, turn by turn:

- The model's turn that ends by itself (`finish_reason` stop) with a fenced ```python code
  block, after its thinking (the text after its last `</think>`, the whole turn when there is
  none), asks for that block to run; the last such block when it wrote several.
- The block runs in the `python` tool (`rl.tools:python`: a fresh process, a time limit, no
  network). What it printed, with what went wrong (a traceback, `[exit code -9]`, `[timed
  out after 5 s]`, or the call's own error: `tool 'python' timed out after 10 s`), comes back
  as one `tool` message rendered by the tokenizer's own chat template, with the generation
  prompt of the model's next turn; "[no output]" when it printed nothing.
- Any other turn is the final answer, scored as it is by `math_reward` (its last \\boxed{},
  else its last expression, against the label): a turn without a code block; a turn cut at
  rollout.max_new_tokens, even in the middle of a code block (the code is not run: a cut turn
  is the model's to avoid, and its reward says so); an empty reply once an episode limit is
  reached (max_turns, max_episode_tokens), which scores 0.
- Past rollout.max_tool_calls, the block is not run: the model is told so and gets one more
  turn, which is the final answer whatever it holds.

The model learns the protocol from SYSTEM_PROMPT, which the prompt rows carry as their system
message (`python -m tasks.python_math IN.jsonl OUT.jsonl` adds it to a prompt file;
recipes/qwen3-30b-a3b-python-tool.yaml).
"""

import asyncio
import json
import re
import sys

from rl.environments import Episode, Reply
from rl.rewards import math_reward

SYSTEM_PROMPT = (
    "You can run Python code to help you solve the problem. To run code, write one "
    "```python code block and end your message there: the next message gives you what the "
    "code printed. Each run is a fresh process with a time limit and no network (nothing is "
    "kept between runs; numpy and sympy are installed), so print() every value you need. "
    "When you know the answer, reply without a code block and put the final answer in "
    "\\boxed{}."
)

CODE_BLOCK = re.compile(r"```python[ \t]*\n(.*?)```", re.DOTALL)
NO_OUTPUT = "[no output]"
NO_MORE_CODE = "[tool call limit reached: no more code runs; give your final answer now]"


class PythonMathEnvironment:
    """Turns of thinking and code until the answer (see the module)."""

    async def run(self, episode: Episode) -> float:
        while True:
            reply = await episode.generate()
            code = code_to_run(reply)
            if code is None:
                return await score(episode, reply.text)
            result = await episode.call_tool("python", code=code)
            if result.error == "max_tool_calls":
                episode.observe_message("tool", NO_MORE_CODE)
                final = await episode.generate()
                return await score(episode, final.text)
            episode.observe_message("tool", result.output or NO_OUTPUT)


def code_to_run(reply: Reply) -> str | None:
    """The code a turn asks to run, or None when the turn is the final answer."""
    if reply.finish_reason != "stop":
        return None
    after_thinking = reply.text.rpartition("</think>")[2]
    blocks = CODE_BLOCK.findall(after_thinking)
    return blocks[-1] if blocks else None


async def score(episode: Episode, final_text: str) -> float:
    """math_reward of the final turn, in a thread: math_verify may take seconds, and the
    other episodes' turns go on meanwhile."""
    record = episode.record
    async with episode.elsewhere():
        return await asyncio.to_thread(math_reward, record.text, final_text, record.label)


def with_system_prompt(row: dict, input_key: str = "prompt") -> dict:
    """A prompt row with SYSTEM_PROMPT as its first message (a text prompt becomes a user
    message); a row that has a system message already gets SYSTEM_PROMPT before it."""
    prompt = row[input_key]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return {**row, input_key: [{"role": "system", "content": SYSTEM_PROMPT}, *messages]}


def main(source: str, target: str) -> None:
    """Write .jsonl prompt file `source` to `target` with SYSTEM_PROMPT in every row."""
    with open(source, encoding="utf-8") as rows, open(target, "w", encoding="utf-8") as out:
        for line in rows:
            if line.strip():
                row = with_system_prompt(json.loads(line))
                out.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tasks.python_math SOURCE.jsonl TARGET.jsonl")
    main(sys.argv[1], sys.argv[2])
