"""The agent endpoint (rl/agent_endpoint.py, `rollout.agent`): unmodified `openai` client code
drives episodes on the real transformers engine and the built-in model. The trained sequence
is the engine's own tokens across turns, the agent's later messages are masked observations,
the replies are the engine's tokens decoded, the trajectory is append-only (400s the agent may
catch), an agent at work holds no other episode's turns, and a driver run on real Ray trains
episodes served through the endpoint.

The agents are module-level functions named by path, as a run names them (so they run in the
module imported by that name, maybe not pytest's copy of this file); what they saw goes to its
`SEEN` (their threads write distinct keys)."""

import asyncio
import importlib
import threading
from pathlib import Path

import openai
import pytest
import ray
import torch
from openai import AsyncOpenAI, OpenAI

from config import UserError, load_config
from config.schema import SluiceConfig
from data.prompts import encode_prompt
from inference import create_engine
from inference.engine import SamplingParams
from models.loading import load_tokenizer
from rl.agent_endpoint import AgentEnvironment
from rl.environments import Limits
from rl.episodes import EpisodeRunner
from tasks.digits import make_prompts

REPO = Path(__file__).resolve().parent.parent
HERE = "tests.test_agent_endpoint"
LIMITS = Limits(max_turns=4, max_tokens=64, max_tool_calls=1, max_new_tokens=3)
SYSTEM = {"role": "system", "content": "1 2"}
OBSERVATION = "5 ="
"""What the agents send between their turns (a tool's result, as a user message)."""

SEEN: dict[str, object] = {}


def seen() -> dict[str, object]:
    """SEEN of the agents' module."""
    return importlib.import_module(HERE).SEEN


class RecordingEngine:
    """The real engine, with each call's prompts and completions kept."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []
        self.should_stop = engine.should_stop

    def generate(self, prompts, params, on_completion=None):
        completions = self.engine.generate(prompts, params)
        self.calls.append(([list(p) for p in prompts], completions))
        return completions


@pytest.fixture(scope="module")
def parts():
    config = SluiceConfig()
    tokenizer = load_tokenizer(config.model)
    engine = create_engine(config, torch.device("cpu"), 0, None)
    return tokenizer, engine


def run(parts, agent, count, limits=LIMITS, seed=3):
    """`count` episodes of the agent named `agent` (in this module), all at once."""
    tokenizer, engine = parts
    recording = RecordingEngine(engine)
    path = f"{HERE}:{agent}"
    runner = EpisodeRunner(path, recording, tokenizer, limits, None, None, AgentEnvironment(path))
    records = make_prompts(0)[0][:count]
    seen().clear()
    torch.manual_seed(seed)
    params = SamplingParams(limits.max_new_tokens, 1.0, seed=seed)
    outcomes = runner.run(records, [tokenizer.encode(r.text) for r in records], params)
    return records, outcomes, recording


def client(base_url: str) -> OpenAI:
    return OpenAI(base_url=base_url, api_key="sluice")


def ask(chat: OpenAI, messages: list[dict], **fields):
    return chat.chat.completions.create(model="policy", messages=messages, max_tokens=3, **fields)


def two_turns(base_url, record):
    """A system prompt of its own, the record's text, a reply, an observation, a reply."""
    chat = client(base_url)
    messages = [SYSTEM, {"role": "user", "content": record.text}]
    first = ask(chat, messages, temperature=0.1)  # (ignored: the run's sampling applies)
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": OBSERVATION},
    ]
    SEEN[record.source] = [first, ask(chat, messages)]
    return 0.5


def test_an_openai_client_drives_turns_that_are_the_engines_own_tokens(parts):
    tokenizer = parts[0]
    records, outcomes, recording = run(parts, "two_turns", 4)
    answered = {
        tuple(inputs): completion
        for inputs_of_call, completions in recording.calls
        for inputs, completion in zip(inputs_of_call, completions, strict=True)
    }
    observation = tokenizer.encode(OBSERVATION, add_special_tokens=False)
    for record, outcome in zip(records, outcomes, strict=True):
        # The prompt is the agent's first request rendered, not the actor's encoding.
        messages = [SYSTEM, {"role": "user", "content": record.text}]
        prompt = encode_prompt(tokenizer, messages, True)
        assert outcome.prompt_ids == prompt != tokenizer.encode(record.text)
        turn1 = answered.pop(tuple(prompt))
        turn2 = answered.pop(tuple(prompt + turn1.token_ids + observation))
        c = outcome.completion
        assert c.token_ids == turn1.token_ids + observation + turn2.token_ids
        assert c.loss_mask == [1] * len(turn1.token_ids) + [0] * len(observation) + [1] * len(
            turn2.token_ids
        )
        assert c.log_probs == turn1.log_probs + [0.0] * len(observation) + turn2.log_probs
        assert c.turn_starts == [0, len(turn1.token_ids) + len(observation)]
        assert outcome.reward == 0.5 and outcome.counts.turns == 2
        # What the client parsed: the engine's tokens decoded, its finish reason, the counts.
        for reply, turn, context in [
            (seen()[record.source][0], turn1, len(prompt)),
            (seen()[record.source][1], turn2, len(prompt + turn1.token_ids + observation)),
        ]:
            choice = reply.choices[0]
            assert choice.message.content == tokenizer.decode(
                turn.token_ids, skip_special_tokens=True
            )
            assert choice.message.role == "assistant"
            assert choice.finish_reason == turn.finish_reason
            assert reply.usage.prompt_tokens == context
            assert reply.usage.completion_tokens == len(turn.token_ids)
    assert not answered  # no other turn was generated


def test_a_request_past_an_episode_limit_gets_an_empty_length_reply(parts):
    limits = Limits(max_turns=1, max_tokens=64, max_tool_calls=1, max_new_tokens=3)
    records, outcomes, _ = run(parts, "two_turns", 2, limits)
    for record, outcome in zip(records, outcomes, strict=True):
        second = seen()[record.source][1]
        assert (second.choices[0].message.content, second.choices[0].finish_reason) == (
            "",
            "length",
        )
        assert second.usage.completion_tokens == 0
        assert outcome.end_reason == "max_turns" and outcome.counts.turns == 1
        assert outcome.completion.loss_mask[-1] == 1  # the observation after it: not trained


def tolerant(base_url, record):
    """Sends requests the endpoint refuses, catches each 400, then goes on correctly."""
    chat = client(base_url)
    messages = [{"role": "user", "content": record.text}]
    first = ask(chat, messages).choices[0].message.content
    rewritten = [*messages, {"role": "assistant", "content": first + " 9"}]
    answered = [*messages, {"role": "assistant", "content": first}]
    observed = {"role": "user", "content": OBSERVATION}
    refused = [
        ([*rewritten, observed], {}),
        (messages, {}),  # adds nothing
        ([*answered, observed, {"role": "assistant", "content": "7"}, observed], {}),
        (messages, {"n": 2}),
        (messages, {"stream": True}),
        (messages, {"stop": ["="]}),
        (messages, {"tools": [{"type": "function", "function": {"name": "f"}}]}),
    ]
    errors = []
    for request, fields in refused:
        try:
            ask(chat, request, **fields)
        except openai.BadRequestError as error:
            errors.append((error.status_code, error.param, str(error)))
    ask(chat, [*answered, observed])
    SEEN[record.source] = errors
    return 1.0


def test_refused_requests_get_a_400_and_leave_the_trajectory_as_it_was(parts):
    tokenizer = parts[0]
    records, outcomes, _ = run(parts, "tolerant", 2)
    observation = tokenizer.encode(OBSERVATION, add_special_tokens=False)
    for record, outcome in zip(records, outcomes, strict=True):
        errors = seen()[record.source]
        assert [status for status, _, _ in errors] == [400] * 7
        fields = ["messages"] * 3 + ["n", "stream", "stop", "tools"]
        assert [param for _, param, _ in errors] == fields
        assert "messages[1] (assistant) differs" in errors[0][2] and "append-only" in errors[0][2]
        assert "adds none to the conversation so far (2)" in errors[1][2]
        assert "a new assistant message" in errors[2][2]
        # Two turns and the one observation, as if the refused requests had never come.
        c = outcome.completion
        assert outcome.counts.turns == 2
        assert outcome.counts.observation_tokens == len(observation)
        start = c.turn_starts[1]
        assert c.token_ids[start - len(observation) : start] == observation


def rewrites(base_url, record):
    chat = client(base_url)
    first = ask(chat, [{"role": "user", "content": record.text}]).choices[0].message.content
    ask(chat, [{"role": "user", "content": "3"}, {"role": "assistant", "content": first}, SYSTEM])
    return 1.0


def test_an_agent_that_lets_the_400_raise_stops_the_run_with_the_reason(parts):
    message = f"rollout.agent {HERE}:rewrites: the agent raised BadRequestError.*append-only"
    with pytest.raises(UserError, match=message):
        run(parts, "rewrites", 2)


EPISODES = 8
WAITER = make_prompts(0)[0][0].source
others_done = threading.Semaphore(0)


def patient(base_url, record):
    """Two turns; the first episode's agent, between them, waits for every other episode to
    end (its work takes that long): the others' turns must not wait for it."""
    chat = client(base_url)
    messages = [{"role": "user", "content": record.text}]
    first = ask(chat, messages).choices[0].message.content
    if record.source == WAITER:
        for _ in range(EPISODES - 1):
            assert others_done.acquire(timeout=60), "the other episodes stalled"
    messages += [
        {"role": "assistant", "content": first},
        {"role": "user", "content": OBSERVATION},
    ]
    ask(chat, messages)
    if record.source != WAITER:
        others_done.release()
    return 1.0


def test_episodes_interleave_on_the_engine_and_an_agent_at_work_holds_no_one(parts):
    _, outcomes, recording = run(parts, "patient", EPISODES)
    assert [o.counts.turns for o in outcomes] == [2] * EPISODES
    turns = 2 * EPISODES
    sizes = [len(inputs) for inputs, _ in recording.calls]
    assert sum(sizes) == turns
    # How many turns share an engine call depends on when the agents' requests arrive (an
    # agent at work is not waited for), so that is not asserted; the order below is certain.
    # The waiting episode's second turn came last, alone: everyone else had ended.
    waiter = outcomes[0].completion
    before_its_last_turn = waiter.token_ids[: waiter.turn_starts[1]]
    assert recording.calls[-1][0] == [outcomes[0].prompt_ids + before_its_last_turn]


async def async_two_turns(base_url, record):
    chat = AsyncOpenAI(base_url=base_url, api_key="sluice")
    messages = [{"role": "user", "content": record.text}]
    first = await chat.chat.completions.create(model="p", messages=messages, max_tokens=2)
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": OBSERVATION},
    ]
    await asyncio.sleep(0)  # (awaiting anything else in between is fine: the agent is away)
    await chat.chat.completions.create(model="p", messages=messages, max_tokens=2)
    return 0.25


def test_an_async_agent_runs_on_the_episodes_loop(parts):
    _, outcomes, recording = run(parts, "async_two_turns", 3)
    assert [(o.reward, o.counts.turns) for o in outcomes] == [(0.25, 2)] * 3
    assert sum(len(inputs) for inputs, _ in recording.calls) == 6


def no_request(base_url, record):
    return 1.0


def not_a_number(base_url, record):
    ask(client(base_url), [{"role": "user", "content": record.text}])
    return "high"


def raises(base_url, record):
    raise ValueError("the agent broke")


@pytest.mark.parametrize(
    ("agent", "message"),
    [
        ("no_request", "returned without asking its base_url for a chat completion"),
        ("not_a_number", "returned 'high'; it must return the episode's reward as a finite"),
        ("raises", "the agent raised ValueError: the agent broke"),
    ],
)
def test_a_broken_agent_stops_the_run_with_its_name(parts, agent, message):
    with pytest.raises(UserError, match=f"rollout.agent {HERE}:{agent}: .*{message}"):
        run(parts, agent, 2)


def test_the_rollout_agent_key_builds_the_endpoint_and_refuses_contradictions(parts):
    from actors.rollout_actor import _episode_runner

    config = SluiceConfig()
    config.rollout.agent = "examples.agents.echo_agent:agent"
    config.data.chat_template_kwargs = {"enable_thinking": False}
    config.validate()
    tokenizer, engine = parts
    runner = _episode_runner(config.rollout, engine, tokenizer, None, 0, config.data)
    assert isinstance(runner.environment, AgentEnvironment)
    assert runner.environment.template_kwargs == {"enable_thinking": False}
    refusals = [
        ("environment", "tasks.lookup:LookupEnvironment", "are both set"),
        ("tools", {"lookup": "tasks.lookup:lookup"}, "never by rollout.agent"),
        ("reward", "rl.rewards:math_reward", "is not used with rollout.agent="),
        ("agent", "examples.agents.echo_agent", "must be written as module:function"),
    ]
    for key, value, message in refusals:
        config = SluiceConfig()
        config.rollout.agent = "examples.agents.echo_agent:agent"
        setattr(config.rollout, key, value)
        with pytest.raises(UserError, match=message):
            config.validate()
    with pytest.raises(UserError, match="cannot import module 'no_such_module'"):
        AgentEnvironment("no_such_module:agent")
    with pytest.raises(UserError, match="has no function 'missing'"):
        AgentEnvironment("examples.agents.echo_agent:missing")


def test_a_driver_run_trains_episodes_served_through_the_endpoint(tmp_path):
    from driver import Driver

    ray.init(address="local", num_cpus=4)
    try:
        config = load_config(
            REPO / "recipes" / "tiny.yaml",
            {
                "num_steps": "2",
                "logging.output_dir": str(tmp_path),
                "logging.progress_bar": "false",
                "logging.eval_every": "0",
                "rollout.agent": "examples.agents.echo_agent:agent",
                "rollout.num_engines": "1",
                "rollout.batch_size": "16",
                "rollout.samples_per_prompt": "4",
                "rollout.groups_per_batch": "2",
                "train.num_workers": "1",
            },
        )
        with Driver(config) as driver:
            steps = [driver.step() for _ in range(2)]
    finally:
        ray.shutdown()
    for metrics in steps:
        assert metrics["rollout/episodes"] == 16
        assert metrics["rollout/turns_per_episode"] == 2.0  # the agent's two requests
        assert metrics["rollout/observation_tokens_per_episode"] > 0  # its echo, masked
        assert metrics["train/tokens"] > 0
