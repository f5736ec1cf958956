"""An example agent: plain `openai` client code, trained as it is (`rl/agent_endpoint.py`).

Name it in a run as `rollout.agent: examples.agents.echo_agent:agent`. It fits the built-in
digits task (`7 2 9 4 =`, answer `7`): it asks the prompt, echoes the model's first answer back
as a user message (`7 =`, "say it again"), and scores the second answer with the task's reward.
Both answers are the model's turns, trained on the same reward; the echoed message is an
observation (read, not trained).
"""

from openai import OpenAI

from data.prompts import PromptRecord
from tasks.digits import reward

MAX_TOKENS = 2


def agent(base_url: str, record: PromptRecord) -> float:
    client = OpenAI(base_url=base_url, api_key="sluice")
    messages = [{"role": "user", "content": record.text}]
    first = ask(client, messages)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": f"{first} ="}]
    second = ask(client, messages)
    return reward(record.text, second, record.label)


def ask(client: OpenAI, messages: list[dict]) -> str:
    reply = client.chat.completions.create(model="policy", messages=messages, max_tokens=MAX_TOKENS)
    return reply.choices[0].message.content
