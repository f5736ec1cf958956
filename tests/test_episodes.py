"""Multi-turn episodes (rl/environments.py, rl/episodes.py) on the real transformers engine and
the built-in model: the trajectory is the engine's own tokens across turns (each turn
generated on exactly the tokens before it), observations are masked out and carry no
log-probs, the limits end episodes with their reason, and bad environments fail by name.

The tools here run in-process (an object with the pool's `call`): tests/test_tools.py tests the
Ray tool actor, tests/test_tool_task.py the whole loop through it."""

import asyncio
import dataclasses
import time

import pytest
import torch

from config import UserError
from config.schema import SluiceConfig
from inference import create_engine
from inference.engine import GenerationAborted, SamplingParams
from models.loading import load_tokenizer
from rl.environments import Episode, Limits, Turn
from rl.episodes import EpisodeRunner
from tasks.lookup import LookupEnvironment, lookup, make_prompts, table


class InProcessTools:
    """The tool pool's interface, calling the function in this process."""

    def __init__(self):
        self.calls = []

    async def call(self, name, arguments):
        from rl.tools import ToolResult

        self.calls.append((name, arguments))
        start = time.perf_counter()
        return ToolResult(lookup(**arguments), None, time.perf_counter() - start)

    def close(self):
        pass


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


def run(parts, environment, records, limits, tools=None, seed=3):
    tokenizer, engine = parts
    recording = RecordingEngine(engine)
    runner = EpisodeRunner(environment, recording, tokenizer, limits, tools or InProcessTools())
    ids = [tokenizer.encode(r.text) for r in records]
    torch.manual_seed(seed)
    return runner.run(records, ids, SamplingParams(3, 1.0, seed=seed)), recording, ids


class AlwaysCall:
    """Every episode: a turn, the tool's answer as an observation, a second turn."""

    async def run(self, episode: Episode) -> float:
        await episode.generate()
        result = await episode.call_tool("lookup", key=episode.record.text)
        episode.observe(f"{result.output} =")
        await episode.generate()
        return 1.0


def test_the_trained_tokens_are_the_engines_own_across_turns(parts):
    records = make_prompts(0)[0][:12]
    limits = Limits(max_turns=4, max_tokens=32, max_tool_calls=2, max_new_tokens=3)
    outcomes, recording, prompt_ids = run(parts, "tests.test_episodes:AlwaysCall", records, limits)
    first_inputs, first = recording.calls[0]  # every episode's first turn, in one call
    assert first_inputs == prompt_ids
    # What the engine was asked for and answered (each episode's inputs are its own: the
    # prompts differ).
    answered = {
        tuple(inputs): completion
        for call_inputs, completions in recording.calls[1:]
        for inputs, completion in zip(call_inputs, completions, strict=True)
    }
    tokenizer = parts[0]
    for i, (record, outcome) in enumerate(zip(records, outcomes, strict=True)):
        observation = tokenizer.encode(f"{table()[record.text]} =", add_special_tokens=False)
        turn1 = first[i]
        # turn 2 was generated on exactly the prompt, turn 1's tokens and the observation
        turn2 = answered.pop(tuple(prompt_ids[i] + turn1.token_ids + observation))
        c = outcome.completion
        assert c.token_ids == turn1.token_ids + observation + turn2.token_ids
        assert c.loss_mask == [1] * len(turn1.token_ids) + [0] * len(observation) + [1] * len(
            turn2.token_ids
        )
        assert c.log_probs == turn1.log_probs + [0.0] * len(observation) + turn2.log_probs
        assert c.turn_starts == [0, len(turn1.token_ids) + len(observation)]
        assert outcome.counts.turns == 2 and outcome.counts.tool_calls == 1
        assert outcome.counts.observation_tokens == len(observation)
        assert outcome.end_reason is None
    assert not answered  # no other turn was generated


def test_routing_replay_gets_each_model_tokens_experts_from_the_turn_that_sampled_it():
    config = SluiceConfig()
    config.algorithm.routing_replay = True
    tokenizer = load_tokenizer(config.model)
    engine = create_engine(config, torch.device("cpu"), 0, None)
    records = make_prompts(1)[0][:6]
    limits = Limits(max_turns=4, max_tokens=32, max_tool_calls=2, max_new_tokens=3)
    outcomes, recording, prompt_ids = run(
        (tokenizer, engine), "tests.test_episodes:AlwaysCall", records, limits
    )
    (_, first), *later = recording.calls  # turn 2: one engine call per distinct length
    second_inputs = [inputs for call_inputs, _ in later for inputs in call_inputs]
    second = [completion for _, completions in later for completion in completions]
    for i, outcome in enumerate(outcomes):
        c = outcome.completion
        j = second_inputs.index(prompt_ids[i] + c.token_ids[: c.turn_starts[1]])
        turn1, turn2 = first[i], second[j]
        p, n1 = len(prompt_ids[i]), len(turn1.token_ids)
        assert c.routed_experts.shape == turn2.routed_experts.shape  # the whole sequence
        assert c.routed_experts.shape[0] == p + len(c.token_ids) - 1
        # positions p-1 .. p+n1-2 chose turn 1's tokens: turn 1's routing, not the prefill's
        assert (c.routed_experts[p - 1 : p + n1 - 1] == turn1.routed_experts[p - 1 :]).all()
        # everything after: turn 2's own (its prefill over the observation, then its decode)
        rest = slice(p + n1 - 1, None)
        assert (c.routed_experts[rest] == turn2.routed_experts[rest]).all()


def test_the_lookup_environment_rewards_the_tool_path(parts):
    records = make_prompts(0)[0][:32]
    limits = Limits(max_turns=2, max_tokens=16, max_tool_calls=1, max_new_tokens=2)
    tools = InProcessTools()
    outcomes, _, _ = run(parts, "tasks.lookup:LookupEnvironment", records, limits, tools)
    called = [o for o in outcomes if o.counts.tool_calls]
    assert len(tools.calls) == len(called) > 0  # a random model calls now and then
    for outcome in outcomes:
        tokens = parts[0].convert_ids_to_tokens(outcome.completion.token_ids)
        assert (tokens[0] in ("<eos>", "<pad>", "<bos>")) == bool(outcome.counts.tool_calls)
        assert outcome.reward in ((0.0, 1.0) if outcome.counts.tool_calls else (0.0,))


class Chatty:
    """Generates and observes until a limit stops it."""

    async def run(self, episode: Episode) -> float:
        while (await episode.generate()).finish_reason != "limit":
            await episode.call_tool("lookup", key="1 2")
            episode.observe("3 4 5 6 7 8")
        return 0.0


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        (Limits(max_turns=2, max_tokens=64, max_tool_calls=9, max_new_tokens=2), "max_turns"),
        (Limits(max_turns=9, max_tokens=14, max_tool_calls=9, max_new_tokens=2), "max_tokens"),
    ],
)
def test_a_limit_ends_the_episode_with_its_reason(parts, limits, reason):
    records = make_prompts(0)[0][:4]
    outcomes, _, prompt_ids = run(parts, "tests.test_episodes:Chatty", records, limits)
    for outcome, ids in zip(outcomes, prompt_ids, strict=True):
        assert outcome.end_reason == reason
        assert outcome.counts.turns <= limits.max_turns
        assert len(ids) + len(outcome.completion.token_ids) <= limits.max_tokens
        assert outcome.completion.loss_mask[-1] == 1  # observations after the last turn: dropped


class TooManyCalls:
    async def run(self, episode: Episode) -> float:
        await episode.generate()
        results = [await episode.call_tool("lookup", key="1 2") for _ in range(3)]
        return float(sum(r.error is None for r in results))


def test_calls_past_max_tool_calls_are_not_made(parts):
    tools = InProcessTools()
    limits = Limits(max_turns=2, max_tokens=16, max_tool_calls=2, max_new_tokens=2)
    records = make_prompts(0)[0][:2]
    outcomes, _, _ = run(parts, "tests.test_episodes:TooManyCalls", records, limits, tools)
    assert len(tools.calls) == 4
    assert [o.reward for o in outcomes] == [2.0, 2.0]
    assert {o.end_reason for o in outcomes} == {"max_tool_calls"}


class NoTurn:
    async def run(self, episode: Episode) -> float:
        return 1.0


class NotANumber:
    async def run(self, episode: Episode) -> float:
        await episode.generate()
        return "high"


class Raises:
    async def run(self, episode: Episode) -> float:
        await episode.generate()
        raise ValueError("the environment broke")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("NoTurn", "returned before the model's first turn"),
        ("NotANumber", "returned 'high'; it must return the episode's reward as a finite number"),
        ("Raises", "its run\\(\\) raised ValueError: the environment broke"),
        ("Missing", "has no class 'Missing'"),
    ],
)
def test_a_broken_environment_stops_with_its_name(parts, name, message):
    limits = Limits(max_turns=2, max_tokens=16, max_tool_calls=1, max_new_tokens=2)
    with pytest.raises(UserError, match=f"tests.test_episodes:{name}.*{message}"):
        run(parts, f"tests.test_episodes:{name}", make_prompts(0)[0][:2], limits)


def test_observe_message_renders_only_the_new_message(parts):
    tokenizer = parts[0]
    limits = Limits(max_turns=2, max_tokens=64, max_tool_calls=1, max_new_tokens=2)
    episode = Episode(make_prompts(0)[0][0], [5, 6], tokenizer, limits, None, None)
    added = episode.observe_message("tool", "7 =")
    # The built-in template closes a non-user message with <eos> and joins messages by a space.
    assert tokenizer.convert_ids_to_tokens(added) == ["7", "=", "<eos>"]
    assert episode.loss_mask == [0, 0, 0] and episode.prompt_ids == [5, 6]


def test_tools_without_an_environment_and_an_unused_reward_are_refused():
    config = SluiceConfig()
    config.rollout.tools = {"lookup": "tasks.lookup:lookup"}
    with pytest.raises(UserError, match=r"rollout.tools=\['lookup'\] needs rollout.environment"):
        config.validate()
    config.rollout.environment = "tasks.lookup:LookupEnvironment"
    config.validate()
    config.rollout.reward = "rl.rewards:math_reward"
    with pytest.raises(UserError, match=r"rollout\.reward='rl.rewards:math_reward' is not used"):
        config.validate()


def test_the_environment_class_is_found_by_path():
    from rl.environments import load_environment

    assert isinstance(load_environment("tasks.lookup:LookupEnvironment"), LookupEnvironment)
    with pytest.raises(UserError, match="must be written as module:Class"):
        load_environment("tasks.lookup")
    with pytest.raises(UserError, match="cannot import module 'no_such_module'"):
        load_environment("no_such_module:Env")


class WaitsElsewhereForTheOthers:
    """Episode 0 awaits something that is not the engine (inside `episode.elsewhere()`) until
    every other episode has had its second turn; the others take two turns."""

    def __init__(self):
        self.all_done, self.others_done = asyncio.Event(), 0

    async def run(self, episode: Episode) -> float:
        if episode.record.source.endswith("#0"):
            async with episode.elsewhere():
                await asyncio.wait_for(self.all_done.wait(), timeout=60)
            await episode.generate()
            return 0.0
        await episode.generate()
        episode.observe("1 =")
        await episode.generate()
        self.others_done += 1
        if self.others_done == 3:
            self.all_done.set()
        return 0.0


def test_an_episode_waiting_elsewhere_does_not_hold_the_others_turns(parts):
    limits = Limits(max_turns=2, max_tokens=32, max_tool_calls=0, max_new_tokens=2)
    records = make_prompts(0)[0][:4]
    records = [dataclasses.replace(r, source=f"x#{i}") for i, r in enumerate(records)]
    outcomes, recording, _ = run(
        parts, "tests.test_episodes:WaitsElsewhereForTheOthers", records, limits
    )
    # The others' two turns went to the engine while episode 0 waited; then its one turn.
    assert [len(inputs) for inputs, _ in recording.calls] == [3, 3, 1]
    assert [o.counts.turns for o in outcomes] == [1, 2, 2, 2]


def test_a_run_cancelled_between_turns_stops_there_and_keeps_nothing(parts):
    """rollout.partial: abort cancels the actor's call; the engine's flag is checked before
    each turn, so no episode goes on (or is returned) with a cut turn."""
    tokenizer, engine = parts
    cancelled = []
    recording = RecordingEngine(engine)
    recording.should_stop = lambda: bool(cancelled)
    limits = Limits(max_turns=4, max_tokens=32, max_tool_calls=2, max_new_tokens=3)
    runner = EpisodeRunner(
        "tests.test_episodes:AlwaysCall",
        recording,
        tokenizer,
        limits,
        InProcessTools(),
        before_turn=lambda: cancelled.append(True),  # the cancel lands after the first turn
    )
    records = make_prompts(0)[0][:4]
    ids = [tokenizer.encode(r.text) for r in records]
    with pytest.raises(GenerationAborted):
        runner.run(records, ids, SamplingParams(3, 1.0, seed=1))
    assert len(recording.calls) == 1  # the first turns only


class ChatTurns:
    """Three model turns with a tool message and a user message between them."""

    async def run(self, episode: Episode) -> float:
        await episode.generate()
        episode.observe_message("tool", "7 =")
        await episode.generate()
        episode.observe_messages([{"role": "user", "content": "and?"}])
        await episode.generate()
        return 0.0


def test_a_chat_built_message_by_message_reads_as_the_template_renders_it_whole():
    """ChatML (Qwen's): each message rendered on its own, after the model's `<|im_end|>` the
    newline its turn did not generate; the trajectory is the whole conversation's rendering."""
    from tests.chat_tokenizer import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    replies = iter(["I ask.", "It is 7.", "Done."])

    async def model(token_ids, max_new_tokens):
        ids = [*tokenizer.encode(next(replies), add_special_tokens=False), tokenizer.eos_token_id]
        return Turn(ids, [-1.0] * len(ids), "stop")

    question = [{"role": "user", "content": "What is 3 + 4?"}]
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_dict=False)
    limits = Limits(max_turns=3, max_tokens=4096, max_tool_calls=0, max_new_tokens=64)
    episode = Episode(make_prompts(0)[0][0], prompt, tokenizer, limits, model, None)
    asyncio.run(ChatTurns().run(episode))
    whole = [
        *question,
        {"role": "assistant", "content": "I ask."},
        {"role": "tool", "content": "7 ="},
        {"role": "assistant", "content": "It is 7."},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "Done."},
    ]
    rendered = tokenizer.apply_chat_template(whole, return_dict=False)
    assert episode.token_ids == rendered[: len(episode.token_ids)]
    assert tokenizer.decode(rendered[len(episode.token_ids) :]) == "\n"  # after the last turn
    assert tokenizer.decode(episode.response_ids[: episode.turn_starts[1]]).startswith(
        "I ask.<|im_end|>\n<|im_start|>tool\n"
    )
