"""Running many multi-turn episodes on one engine (`rollout.environment`, or `rollout.agent`
through `rl/agent_endpoint.py`).

Each episode is a coroutine (`Environment.run`, see `rl/environments.py`) on one asyncio loop
in the rollout actor's thread. Their turns are batched: `generate` queues the episode's
request, and the queued requests go to the engine in one call as soon as every live episode is
either queued or waiting for a tool (whose calls run in a Ray actor meanwhile). The engine call
itself runs in a worker thread, so tool calls finish while it decodes; one engine call runs at
a time. The engine gets each episode's exact token sequence: prompt, model and observation
tokens, never text.

Each engine call gets a sampling seed of its own, derived from the step's. The cancel flag the
engine polls while decoding (`rollout.partial: abort`) is also checked before and after each
engine call: a cancelled run raises `GenerationAborted` between turns, and no episode goes on
with a cut turn. Rewards are checked like reward functions' (a finite number); an exception
from an episode stops the run with an error naming the environment.
"""

import asyncio
import contextlib
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

from config.errors import UserError
from data.prompts import PromptRecord
from inference.engine import Completion, GenerationAborted, InferenceEngine, SamplingParams
from rl.environments import Environment, Episode, EpisodeCounts, Limits, Turn, load_environment


@dataclass
class EpisodeOutcome:
    """A finished episode, as the rollout batch takes it."""

    completion: Completion
    """Its trained part: response ids (model and observation tokens up to the last model
    token), log-probs (0.0 for observations), loss mask, where each turn starts, the last
    turn's finish reason, the oldest weight version of its turns, and every model token's
    routed experts."""
    reward: float
    counts: EpisodeCounts
    end_reason: str | None
    prompt_ids: list[int]
    """The prompt its turns were generated on: the one it was given, unless the environment
    replaced it before the first turn (the agent endpoint: the agent's first request)."""


@dataclass
class _Request:
    token_ids: list[int]
    max_new_tokens: int
    done: asyncio.Future


@dataclass
class _Batcher:
    """Queues turns and sends them to the engine together (see the module)."""

    engine: InferenceEngine
    params: SamplingParams
    live: int = 0
    in_tool: int = 0
    queued: list[_Request] = field(default_factory=list)
    running: bool = False
    calls: int = 0
    seeded_calls: int = 0
    before_turn: Callable[[], None] | None = None
    """Called before every engine call but the first (mid-episode): the fault drills' point."""

    async def generate(self, token_ids: list[int], max_new_tokens: int) -> Turn:
        request = _Request(token_ids, max_new_tokens, asyncio.get_running_loop().create_future())
        self.queued.append(request)
        self.maybe_flush()
        return await request.done

    def maybe_flush(self) -> None:
        """Send the queue once every live episode is queued or in a tool call."""
        if self.running or not self.queued or len(self.queued) + self.in_tool < self.live:
            return
        batch, self.queued = self.queued, []
        self.running = True
        asyncio.get_running_loop().create_task(self._send(batch))

    async def _send(self, batch: list[_Request]) -> None:
        try:
            completions = await asyncio.to_thread(self._engine_call, batch)
        except BaseException as error:
            for request in batch:
                request.done.set_exception(error)
        else:
            for request, c in zip(batch, completions, strict=True):
                turn = Turn(c.token_ids, c.log_probs, c.finish_reason)
                turn.routed_experts, turn.weight_version = c.routed_experts, c.weight_version
                request.done.set_result(turn)
        finally:
            self.running = False
            self.maybe_flush()

    def _engine_call(self, batch: list[_Request]) -> list[Completion]:
        """One engine call per distinct turn length (a call has one max_new_tokens)."""
        if self.calls and self.before_turn is not None:
            self.before_turn()
        self.calls += 1
        out: list[Completion | None] = [None] * len(batch)
        for length in sorted({r.max_new_tokens for r in batch}):
            indices = [i for i, r in enumerate(batch) if r.max_new_tokens == length]
            params = SamplingParams(
                length,
                self.params.temperature,
                self.params.top_p,
                self.params.top_k,
                self.params.greedy,
                self._next_seed(),
            )
            prompts = [batch[i].token_ids for i in indices]
            self._check_not_stopped()
            for i, completion in zip(indices, self.engine.generate(prompts, params), strict=True):
                out[i] = completion
        self._check_not_stopped()  # a stopped engine returns cut turns: none is kept
        return out

    def _next_seed(self) -> int | None:
        """A seed of its own for every engine call, below 2**31 like the step's: SGLang seeds
        prompt i of a call `request_seed(seed, i)`, so two calls of one round (two turn
        lengths) sharing a seed gave two episodes' turns one sampling seed, and a step seed
        near 2**31 plus the call count overflowed SGLang's int64 `sampling_seed` (HTTP 400)."""
        if self.params.seed is None:
            return None
        self.seeded_calls += 1
        return (self.params.seed + self.seeded_calls) % 2**31

    def _check_not_stopped(self) -> None:
        """Between turns, the cancel flag the engine polls while decoding (partial: abort):
        a cancelled run stops here, and no episode goes on with a cut turn."""
        stop = self.engine.should_stop
        if stop is not None and stop():
            raise GenerationAborted("episodes cancelled between turns")

    def episode_ended(self) -> None:
        self.live -= 1
        self.maybe_flush()


class EpisodeRunner:
    """Runs a rollout actor's episodes: the environment, its tools, the batched engine."""

    def __init__(
        self,
        path: str,
        engine: InferenceEngine,
        tokenizer,
        limits: Limits,
        tools,
        before_turn: Callable[[], None] | None = None,
        environment: Environment | None = None,
        chat_template_kwargs: dict | None = None,
    ):
        """`environment`: one already built (rollout.agent's, `rl/agent_endpoint.py`), which
        `path` names in errors; else the class `path` names is built."""
        self.path = path
        self.before_turn = before_turn
        self.environment = environment if environment is not None else load_environment(path)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = limits
        self.tools = tools

    def close(self) -> None:
        if self.tools is not None:
            self.tools.close()

    def run(
        self, records: list[PromptRecord], prompt_ids: list[list[int]], params: SamplingParams
    ) -> list[EpisodeOutcome]:
        """One episode per (record, prompt ids) pair, all at once; in order."""
        return asyncio.run(self._run_all(records, prompt_ids, params))

    async def _run_all(self, records, prompt_ids, params) -> list[EpisodeOutcome]:
        batcher = _Batcher(self.engine, params, live=len(records), before_turn=self.before_turn)

        @contextlib.asynccontextmanager
        async def elsewhere():
            batcher.in_tool += 1
            batcher.maybe_flush()
            try:
                yield
            finally:
                batcher.in_tool -= 1

        episodes = [
            Episode(
                record,
                ids,
                self.tokenizer,
                self.limits,
                batcher.generate,
                self.tools,
                elsewhere,
                self.chat_template_kwargs,
            )
            for record, ids in zip(records, prompt_ids, strict=True)
        ]

        async def one(episode: Episode) -> EpisodeOutcome:
            try:
                reward = await self.environment.run(episode)
            except (UserError, GenerationAborted):
                raise
            except Exception as error:
                raise UserError(
                    f"rollout.environment {self.path}: its run() raised "
                    f"{type(error).__name__}: {error}"
                ) from error
            finally:
                batcher.episode_ended()
            return self._outcome(episode, reward)

        # An environment that is an async context manager (the agent endpoint, serving HTTP)
        # is entered around the batch's episodes, in their event loop.
        scope = self.environment
        if not isinstance(scope, contextlib.AbstractAsyncContextManager):
            scope = contextlib.nullcontext()
        async with scope:
            return list(await asyncio.gather(*(one(e) for e in episodes)))

    def _outcome(self, episode: Episode, reward) -> EpisodeOutcome:
        if isinstance(reward, bool):
            reward = float(reward)
        if not isinstance(reward, numbers.Real) or not math.isfinite(reward):
            raise UserError(
                f"rollout.environment {self.path}: run() returned {reward!r}; it must return "
                f"the episode's reward as a finite number"
            )
        response, mask, log_probs = episode.trained_part()
        last = episode.last_turn
        if last is None:
            raise UserError(
                f"rollout.environment {self.path}: run() returned before the model's first "
                f"turn; an episode must call `await episode.generate()` at least once"
            )
        completion = Completion(
            token_ids=response,
            log_probs=log_probs,
            finish_reason=last.finish_reason,
            routed_experts=episode.routed_experts(),
            weight_version=episode.weight_version(),
            loss_mask=mask,
            turn_starts=list(episode.turn_starts),
        )
        return EpisodeOutcome(
            completion, float(reward), episode.counts, episode.end_reason, episode.prompt_ids
        )
