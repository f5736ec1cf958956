"""Multi-turn environments: what an episode's code is written against.

An environment is a class named as `module:Class` in `rollout.environment` (built once per
rollout actor, with no arguments) with one coroutine::

    class MyEnvironment:
        async def run(self, episode: Episode) -> float:
            reply = await episode.generate()                 # the model's turn
            result = await episode.call_tool("python", code=extract(reply.text))
            episode.observe(result.output)                   # tokens the model reads, not trained
            reply = await episode.generate()                 # the next turn, on everything so far
            return score(reply.text, episode.record.label)   # the episode's reward

- The trajectory is the token sequence itself: the prompt's tokens, then the model's tokens
  exactly as the engine sampled them (trained: loss mask 1, with the engine's log-probs), then
  the observation tokens the environment adds (loss mask 0, no log-probs). Nothing is ever
  re-tokenized: each turn is generated on the trajectory's own tokens, and the trainer gets
  those same tokens.
- `observe(text)` encodes only the new text (no special tokens added); `observe_message(role,
  content)` renders one chat message with the tokenizer's own template (and
  data.chat_template_kwargs), as the difference between a fixed conversation with and without
  it, never by re-rendering the history; after a turn the model ended, what the template
  writes after an end-of-turn token comes first (Qwen's newline after `<|im_end|>`).
- Limits (`rollout.max_turns`, `rollout.max_episode_tokens`, `rollout.max_tool_calls`): once
  one is reached, `generate` returns an empty reply at once, `call_tool` returns an error
  result without calling, `observe` keeps only what fits, and `episode.end_reason` names the
  limit; the environment still returns the reward it wants. Trailing observation tokens after
  the last model turn are dropped (nothing after them is trained).
- Many episodes run at once on one engine: each `generate` waits until every episode that is
  not waiting for a tool has asked for its turn, then all are sampled in one engine call
  (`rl/episodes.py`).
- Tools run in a Ray actor on the rollout actor's node (`rl/tools.py`), each call with its own
  time and memory limit: a tool that hangs or crashes costs that call (an error result), never
  the episode.
- Slow work belongs in a tool (`call_tool`) or inside `async with episode.elsewhere():`;
  awaiting anything else holds the other episodes' turns until it returns.
- The reward must be a finite number; anything else, or an exception from `run`, stops the run
  with an error naming the environment.
"""

import contextlib
import importlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from config.errors import UserError
from data.prompts import PromptRecord


@dataclass(frozen=True)
class Reply:
    """One model turn."""

    token_ids: list[int]
    text: str
    finish_reason: str
    """`stop` (ended on EOS, which is in token_ids), `length` (the turn's token limit), or
    `limit` (an episode limit was reached before the turn: no tokens)."""


@dataclass(frozen=True)
class Limits:
    max_turns: int
    max_tokens: int
    """Prompt, model and observation tokens together: the context the episode may fill."""
    max_tool_calls: int
    max_new_tokens: int
    """Tokens one turn may generate (rollout.max_new_tokens)."""


@dataclass
class Turn:
    """What the engine returned for one turn (`rl/episodes.py` fills it)."""

    token_ids: list[int]
    log_probs: list[float]
    finish_reason: str
    routed_experts: Any = None
    weight_version: int | None = None


GenerateFn = Callable[[list[int], int], Awaitable[Turn]]
"""generate(token_ids, max_new_tokens): the engine's next turn on `token_ids`."""


@dataclass
class EpisodeCounts:
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_seconds: float = 0.0
    observation_tokens: int = 0


class Episode:
    """One episode's trajectory and the verbs an environment acts on it with."""

    def __init__(
        self,
        record: PromptRecord,
        prompt_ids: list[int],
        tokenizer,
        limits: Limits,
        generate_fn: GenerateFn,
        tools: Any | None,
        elsewhere_fn: Callable[[], AbstractAsyncContextManager] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ):
        self.record = record
        self.prompt_ids = list(prompt_ids)
        self.tokenizer = tokenizer
        self.limits = limits
        self._generate = generate_fn
        self._tools = tools
        """The tool pool (`rl.tools.ToolPool`: `await tools.call(name, arguments)`), or None."""
        self._elsewhere = elsewhere_fn
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        """data.chat_template_kwargs: what the prompt was rendered with, so are messages."""
        self.response_ids: list[int] = []
        self.loss_mask: list[int] = []
        self.log_probs: list[float] = []
        self.counts = EpisodeCounts()
        self.end_reason: str | None = None
        """The limit that ended the episode (`max_turns`, `max_tokens`, `max_tool_calls`),
        or None."""
        self.last_turn: Turn | None = None
        self.turn_starts: list[int] = []
        """Where each model turn begins in response_ids (the schema's turn_starts)."""
        self.turns: list[tuple[int, Turn]] = []
        """Each model turn with the length of the context it was sampled on."""

    @property
    def token_ids(self) -> list[int]:
        """The whole trajectory so far: prompt, model and observation tokens."""
        return self.prompt_ids + self.response_ids

    @property
    def room(self) -> int:
        return self.limits.max_tokens - len(self.prompt_ids) - len(self.response_ids)

    async def generate(self, max_new_tokens: int | None = None) -> Reply:
        """The model's next turn on the trajectory so far, appended to it (trained); at most
        `max_new_tokens` tokens (rollout.max_new_tokens, and what the episode has room for)."""
        if self.counts.turns >= self.limits.max_turns:
            return self._ended("max_turns")
        if self.room <= 0:
            return self._ended("max_tokens")
        budget = min(self.limits.max_new_tokens, self.room, max_new_tokens or self.room)
        context = len(self.token_ids)
        turn = await self._generate(self.token_ids, budget)
        self.counts.turns += 1
        self.last_turn = turn
        self.turn_starts.append(len(self.response_ids))
        self.turns.append((context, turn))
        self.response_ids += turn.token_ids
        self.loss_mask += [1] * len(turn.token_ids)
        self.log_probs += list(turn.log_probs)
        text = self.tokenizer.decode(turn.token_ids, skip_special_tokens=True)
        return Reply(list(turn.token_ids), text, turn.finish_reason)

    def _ended(self, reason: str) -> Reply:
        self.end_reason = self.end_reason or reason
        return Reply([], "", "limit")

    def observe(self, text: str) -> list[int]:
        """Append `text`'s tokens (no special tokens added) as an observation: the model reads
        them, the loss does not count them. Returns the tokens appended."""
        return self.observe_tokens(self.tokenizer.encode(text, add_special_tokens=False))

    def observe_message(self, role: str, content: str) -> list[int]:
        """Append one chat message (a tool result, a user turn) rendered by the tokenizer's
        own template, with the generation prompt of the model's next turn."""
        return self.observe_messages([{"role": role, "content": content}])

    def observe_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """Append chat messages rendered together (see `render_added_messages`)."""
        ended = self.last_turn is not None and self.last_turn.finish_reason == "stop"
        stop = self.response_ids[-1] if ended and self.loss_mask[-1] == 1 else None
        added = render_added_messages(
            self.tokenizer, messages, self.chat_template_kwargs, after_stop_token=stop
        )
        return self.observe_tokens(added)

    def observe_tokens(self, token_ids: list[int]) -> list[int]:
        """Append observation tokens as they are (those past max_episode_tokens are cut)."""
        kept = list(token_ids)[: max(self.room, 0)]
        if len(kept) < len(token_ids):
            self.end_reason = self.end_reason or "max_tokens"
        self.response_ids += kept
        self.loss_mask += [0] * len(kept)
        self.log_probs += [0.0] * len(kept)
        self.counts.observation_tokens += len(kept)
        return kept

    async def call_tool(self, name: str, **arguments: Any):
        """Call tool `name` (rollout.tools) with keyword arguments; its `ToolResult`. A call past
        rollout.max_tool_calls is not made (error `max_tool_calls`)."""
        if self._tools is None:
            raise UserError(f"the environment called tool {name!r}, but rollout.tools is empty")
        if self.counts.tool_calls >= self.limits.max_tool_calls:
            from rl.tools import ToolResult

            self.end_reason = self.end_reason or "max_tool_calls"
            return ToolResult(output="tool call limit reached", error="max_tool_calls", seconds=0)
        self.counts.tool_calls += 1
        async with self.elsewhere():
            result = await self._tools.call(name, arguments)
        self.counts.tool_seconds += result.seconds
        self.counts.tool_errors += result.error is not None
        return result

    def elsewhere(self) -> AbstractAsyncContextManager:
        """`async with episode.elsewhere(): await ...` around any wait that is not the engine's
        (a tool of your own, an HTTP call, a sleep): the other episodes' turns go to the engine
        meanwhile, instead of waiting for this episode to ask for its next turn."""
        if self._elsewhere is None:
            return contextlib.nullcontext()
        return self._elsewhere()

    def trained_part(self) -> tuple[list[int], list[int], list[float]]:
        """(response ids, loss mask, log-probs) up to the last model token: observation tokens
        after it are dropped."""
        end = len(self.loss_mask)
        while end and self.loss_mask[end - 1] == 0:
            end -= 1
        return self.response_ids[:end], self.loss_mask[:end], self.log_probs[:end]

    def routed_experts(self):
        """Under routing replay, the experts of every position of the trained sequence [prompt
        + response - 1, layers, top_k], each model token's from the turn that sampled it.

        The last turn's routing covers every position (its prefill read the whole trajectory);
        the positions whose outputs an earlier turn sampled are overwritten with that turn's
        own routing, so R3 replays what the engine did when it chose each trained token."""
        if not self.turns or self.turns[-1][1].routed_experts is None:
            return None
        routed = self.turns[-1][1].routed_experts.copy()
        for context, turn in self.turns[:-1]:
            # The token at position context + j was sampled from position context + j - 1.
            end = turn.routed_experts.shape[0]
            routed[context - 1 : end] = turn.routed_experts[context - 1 : end]
        return routed

    def weight_version(self) -> int | None:
        """The oldest weights any of its turns was sampled with (what staleness counts)."""
        versions = [turn.weight_version for _, turn in self.turns]
        return None if None in versions or not versions else min(versions)


def render_added_messages(
    tokenizer,
    messages: list[dict[str, str]],
    template_kwargs: dict[str, Any],
    after_stop_token: int | None = None,
) -> list[int]:
    """The tokens chat `messages` add to a conversation, with the generation prompt of the
    model's next turn: the difference the tokenizer's own template makes when they are added
    to a fixed one-message conversation. The history is never re-rendered, so a template that
    rewrites earlier turns (dropping their reasoning) cannot change the trajectory.

    `after_stop_token`: the trajectory ends with the model's turn, closed by this token. The
    template writes after a message's end-of-turn token what the turn did not generate (Qwen's
    newline after `<|im_end|>`): that comes first, so the trajectory reads as the template
    would have rendered the whole conversation."""

    def render(conversation: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        try:
            return tokenizer.apply_chat_template(
                conversation,
                tokenize=True,
                add_generation_prompt=generation_prompt,
                return_dict=False,
                **template_kwargs,
            )
        except Exception as error:  # no template, or one that refuses these roles or order
            roles = ", ".join(repr(m.get("role")) for m in messages)
            raise UserError(
                f"the tokenizer's chat template cannot render {roles} message(s) after a user "
                f"message: {error}"
            ) from error

    anchor = [{"role": "user", "content": "."}]
    before, after = render(anchor, False), render([*anchor, *messages], True)
    if after[: len(before)] != before:
        roles = ", ".join(repr(m.get("role")) for m in messages)
        raise UserError(
            f"the tokenizer's chat template renders a conversation differently once {roles} "
            f"message(s) are added, so they cannot be rendered on their own; render them "
            f"yourself and pass the tokens to episode.observe_tokens"
        )
    added = after[len(before) :]
    if after_stop_token is not None and after_stop_token in before:
        end = len(before) - 1 - before[::-1].index(after_stop_token)
        added = before[end + 1 :] + added
    return added


class Environment(Protocol):
    async def run(self, episode: Episode) -> float: ...


def load_environment(path: str) -> Environment:
    """The environment class named `module:Class`, built with no arguments."""
    module_name, _, name = path.partition(":")
    if not module_name or not name:
        raise UserError(
            f"rollout.environment={path!r} must be written as module:Class, e.g. "
            f"tasks.lookup:LookupEnvironment"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(
            f"rollout.environment={path!r}: cannot import module {module_name!r} ({error}); "
            f"it must import on the machines that run the rollout actors"
        ) from error
    cls = getattr(module, name, None)
    if cls is None or not callable(getattr(cls, "run", None)):
        raise UserError(
            f"rollout.environment={path!r}: {module_name} has no class {name!r} with an "
            f"`async def run(self, episode)` method"
        )
    return cls()
