"""Agent code as episodes: an OpenAI-compatible chat endpoint whose completions are the turns.

`rollout.agent: module:function` names a function that runs one episode against an OpenAI-style
chat API and returns its reward::

    def agent(base_url: str, record: PromptRecord) -> float:      # or `async def`
        client = OpenAI(base_url=base_url, api_key="sluice")
        ...client.chat.completions.create(model="policy", messages=[...])...
        return reward

Per episode, `AgentEnvironment.run` gives the function its own `base_url`
(`http://127.0.0.1:PORT/episodes/EPISODE_ID/v1`, served in the rollout actor) and
`POST {base_url}/chat/completions` is served from the episode (`rl/environments.py`):

- Token in, token out, never re-tokenizing the history. The first request's messages, rendered
  with the tokenizer's chat template and the generation prompt, become the episode's prompt:
  the trained sequence starts with exactly the tokens the engine saw, even when the agent
  writes its own system prompt or words the record otherwise (the rollout actor's own encoding
  of the record is replaced: `EpisodeOutcome.prompt_ids`). Each later request must repeat the
  conversation so far unchanged (every assistant message exactly as this endpoint returned
  it) and add messages after it; only those are rendered (one delta, as
  `Episode.observe_message` renders one message) and appended as observation tokens (loss mask
  0). Then the model's turn is generated on the whole trajectory (trained: loss mask 1, with
  the engine's log-probs), and its text is the reply.
- The trajectory is append-only: a request that changes or drops an earlier message, adds an
  assistant message of its own, or adds nothing gets HTTP 400 with an OpenAI-style error (the
  `openai` client raises BadRequestError) and leaves the episode as it was: an agent may catch
  the error and go on; an agent that lets it raise stops the run with the message.
- Refused with HTTP 400, naming the field: `stream`, `n` > 1, function calling (`tools`,
  `functions`, `tool_choice`, assistant messages with `tool_calls`), `stop`, `logprobs`,
  `top_logprobs`, a `response_format` other than text. Ignored: `model`, and the sampling
  fields (`temperature`, `top_p`, `seed`, penalties): the run's sampling (rollout.temperature,
  top_p, top_k; an evaluation's own) is what the trainer's log-probs assume.
- `max_tokens` (or `max_completion_tokens`) bounds the turn, as do rollout.max_new_tokens and
  the room left in rollout.max_episode_tokens. Once an episode limit has ended the episode, a
  request gets an empty reply with finish_reason `length`.

Concurrency: a sync agent runs in a thread of its own (a pool per batch, one thread per running
agent: the engine's calls use the event loop's default pool, which agents waiting on the engine
must not fill), inside `episode.elsewhere()` except while one of its requests is being served,
so the other episodes' turns go to the engine while it works. An async agent runs on the
episodes' event loop, likewise: it must not block the loop. One request at a time per episode.

An engine failure (a cancelled generation included) answers HTTP 500 and stops the run with
that failure once the agent returns; so does an exception from the agent, or a reward that is
not a finite number.
"""

import asyncio
import contextlib
import importlib
import inspect
import math
import numbers
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from config.errors import UserError
from data.prompts import PromptRecord, encode_prompt
from rl.environments import Episode

MAX_AGENT_THREADS = 4096
"""Threads are started only as agents run at once; the bound is there for the pool's sake."""

SHUTDOWN_TIMEOUT_S = 1.0
"""At the end of a batch, how long the server waits for requests still being served (none,
unless an episode failed and stopped the batch)."""

MAX_REQUEST_BYTES = 64 * 1024 * 1024
"""A request body may be this large (a long conversation; aiohttp's default is 1 MiB)."""


def load_agent(path: str) -> Callable:
    """The agent function named `module:function`."""
    module_name, _, name = path.partition(":")
    if not module_name or not name:
        raise UserError(
            f"rollout.agent={path!r} must be written as module:function, e.g. "
            f"examples.agents.echo_agent:agent"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(
            f"rollout.agent={path!r}: cannot import module {module_name!r} ({error}); it must "
            f"import on the machines that run the rollout actors"
        ) from error
    agent = getattr(module, name, None)
    if not callable(agent):
        raise UserError(
            f"rollout.agent={path!r}: {module_name} has no function {name!r} "
            f"(`def {name}(base_url, record) -> float`)"
        )
    return agent


class Refused(Exception):
    """A request the endpoint does not serve: HTTP 400, the episode unchanged."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class AgentEnvironment:
    """The environment of `rollout.agent`: each episode runs the agent function against the
    endpoint. An async context manager: `EpisodeRunner` enters it around each batch of
    episodes, in their event loop, which starts the server (and closes it at the end)."""

    def __init__(self, agent: str, template_kwargs: dict[str, Any] | None = None):
        self.path = agent
        self.agent = load_agent(agent)
        self.template_kwargs = dict(template_kwargs or {})
        """data.chat_template_kwargs, for rendering the agent's messages."""
        self._endpoint: _Endpoint | None = None

    async def __aenter__(self) -> "AgentEnvironment":
        self._endpoint = _Endpoint()
        await self._endpoint.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        endpoint, self._endpoint = self._endpoint, None
        await endpoint.stop()

    async def run(self, episode: Episode) -> float:
        if self._endpoint is None:
            raise RuntimeError("AgentEnvironment.run outside `async with` (EpisodeRunner's)")
        endpoint = self._endpoint  # (still closing this episode's path after the batch ends)
        conversation = _Conversation(episode, self.template_kwargs)
        episode_id = endpoint.open(conversation)
        try:
            await conversation.step_away()
            reward = await self._call_agent(endpoint, episode_id, episode.record)
        except Exception as error:
            raise self._failure(conversation, error) from error
        finally:
            await conversation.close()
            endpoint.close(episode_id)
        if conversation.failure is not None:
            raise conversation.failure
        return self._checked(reward, episode)

    async def _call_agent(self, endpoint: "_Endpoint", episode_id: str, record: PromptRecord):
        base_url = endpoint.base_url(episode_id)
        if inspect.iscoroutinefunction(self.agent):
            return await self.agent(base_url, record)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(endpoint.threads, self.agent, base_url, record)

    def _failure(self, conversation: "_Conversation", error: Exception) -> BaseException:
        """What stops the run: the engine's failure behind the agent's error, if any."""
        if conversation.failure is not None:
            return conversation.failure
        if isinstance(error, UserError):
            return error
        return UserError(
            f"rollout.agent {self.path}: the agent raised {type(error).__name__}: {error}"
        )

    def _checked(self, reward, episode: Episode) -> float:
        if isinstance(reward, bool):
            reward = float(reward)
        if not isinstance(reward, numbers.Real) or not math.isfinite(reward):
            raise UserError(
                f"rollout.agent {self.path}: the agent returned {reward!r}; it must return the "
                f"episode's reward as a finite number"
            )
        if episode.last_turn is None:
            raise UserError(
                f"rollout.agent {self.path}: the agent returned without asking its base_url for "
                f"a chat completion; the completions are the episode's trained tokens, so an "
                f"episode needs at least one"
            )
        return float(reward)


class _Endpoint:
    """One batch's HTTP server on 127.0.0.1: a path per episode, and the agents' threads."""

    def __init__(self):
        self.conversations: dict[str, _Conversation] = {}
        self.threads = ThreadPoolExecutor(MAX_AGENT_THREADS, thread_name_prefix="sluice-agent")
        self._runner: web.AppRunner | None = None
        self._port = 0

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_post("/episodes/{episode}/v1/chat/completions", self._chat_completions)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        # The server first: an agent still running (its batch failed) gets errors, not turns.
        await self._runner.cleanup()
        self.threads.shutdown(wait=False, cancel_futures=True)

    def open(self, conversation: "_Conversation") -> str:
        """A new episode's id (its path)."""
        episode_id = uuid.uuid4().hex
        self.conversations[episode_id] = conversation
        return episode_id

    def base_url(self, episode_id: str) -> str:
        return f"http://127.0.0.1:{self._port}/episodes/{episode_id}/v1"

    def close(self, episode_id: str) -> None:
        del self.conversations[episode_id]

    async def _chat_completions(self, request: web.Request) -> web.Response:
        episode_id = request.match_info["episode"]
        conversation = self.conversations.get(episode_id)
        if conversation is None:
            return _error(404, f"no running episode {episode_id!r} (it has ended)")
        try:
            body = await request.json()
        except ValueError as error:
            return _error(400, f"the request body is not JSON ({error})")
        try:
            return web.json_response(await conversation.complete(episode_id, body))
        except Refused as refusal:
            return _error(400, str(refusal), refusal.param)
        except Exception as error:  # the engine's (its calls are the only other work here)
            conversation.failure = conversation.failure or error
            return _error(500, f"the episode's turn failed: {type(error).__name__}: {error}")


class _Conversation:
    """One episode's side of the endpoint: its messages so far and its place in the batch."""

    def __init__(self, episode: Episode, template_kwargs: dict[str, Any]):
        self.episode = episode
        self.template_kwargs = template_kwargs
        self.messages: list[tuple[str, str]] = []
        """Every message so far (role, content), the endpoint's replies included."""
        self.failure: BaseException | None = None
        """The engine's failure on one of its turns: the run stops with it."""
        self._away: contextlib.AsyncExitStack | None = None
        self._serving = False
        self._closed = False

    async def step_away(self) -> None:
        """The agent works: the other episodes' turns need not wait for this one's."""
        if self._closed:
            return
        self._away = contextlib.AsyncExitStack()
        await self._away.enter_async_context(self.episode.elsewhere())

    async def come_back(self) -> None:
        away, self._away = self._away, None
        if away is not None:
            await away.aclose()

    async def close(self) -> None:
        await self.come_back()
        self._closed = True

    async def complete(self, episode_id: str, body: Any) -> dict:
        """The chat.completion for one request: its new messages appended, then a turn."""
        if self.failure is not None:
            raise self.failure
        if self._serving:
            raise Refused(
                "a request of this episode is already being served: an episode is one "
                "conversation, its requests go one after another"
            )
        self._serving = True
        try:
            messages, max_tokens = _parse(body)
            self._append(messages)
            context = len(self.episode.token_ids)
            await self.come_back()
            try:
                reply = await self.episode.generate(max_new_tokens=max_tokens)
            finally:
                await self.step_away()
            self.messages = [*messages, ("assistant", reply.text)]
            return _completion(episode_id, body, reply, context, self.episode.counts.turns)
        finally:
            self._serving = False

    def _append(self, messages: list[tuple[str, str]]) -> None:
        """Checks the request against the conversation, then adds its new messages' tokens:
        the first request's as the episode's prompt, a later one's as an observation."""
        if messages[-1][0] == "assistant":
            raise Refused(
                "the last message is the assistant's: a request asks for the assistant's next "
                "message (continuing one is not supported)",
                "messages",
            )
        if not self.messages:
            self._set_prompt(messages)
            return
        new = [{"role": role, "content": content} for role, content in self._new_messages(messages)]
        try:  # rendered on their own, after the model's last turn (rl/environments.py)
            self.episode.observe_messages(new)
        except UserError as error:
            raise Refused(str(error), "messages") from error

    def _set_prompt(self, messages: list[tuple[str, str]]) -> None:
        rendered = [{"role": role, "content": content} for role, content in messages]
        try:
            prompt_ids = encode_prompt(self.episode.tokenizer, rendered, True, self.template_kwargs)
        except Exception as error:  # no template, or one that refuses these messages
            raise Refused(f"the chat template cannot render the messages: {error}") from error
        if len(prompt_ids) >= self.episode.limits.max_tokens:
            raise Refused(
                f"the messages are {len(prompt_ids)} tokens, and rollout.max_episode_tokens="
                f"{self.episode.limits.max_tokens} leaves no room for a reply",
                "messages",
            )
        self.episode.prompt_ids = prompt_ids

    def _new_messages(self, messages: list[tuple[str, str]]) -> list[tuple[str, str]]:
        known = len(self.messages)
        for i, (sent, had) in enumerate(zip(messages, self.messages, strict=False)):
            if sent != had:
                raise Refused(
                    f"messages[{i}] ({sent[0]}) differs from the conversation so far, which the "
                    f"episode's trajectory already holds; the trajectory is append-only: send "
                    f"the earlier messages unchanged (each assistant message exactly as this "
                    f"endpoint returned it) and add new ones after them",
                    "messages",
                )
        if len(messages) <= known:
            raise Refused(
                f"the request has {len(messages)} messages and adds none to the conversation "
                f"so far ({known}); the trajectory is append-only",
                "messages",
            )
        new = messages[known:]
        if any(role == "assistant" for role, _ in new):
            raise Refused(
                "a new assistant message: the assistant's messages are this endpoint's replies "
                "(the model's own tokens), not written by the agent",
                "messages",
            )
        return new


_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "stream": (lambda v: not v, "streaming is not supported; send stream=false"),
    "n": (lambda v: v in (None, 1), "one choice per request (n=1): each is an episode's turn"),
    "tools": (lambda v: not v, "function calling is not supported; parse calls from the text"),
    "functions": (lambda v: not v, "function calling is not supported"),
    "tool_choice": (lambda v: v in (None, "none"), "function calling is not supported"),
    "function_call": (lambda v: v in (None, "none"), "function calling is not supported"),
    "stop": (lambda v: not v, "stop sequences are not supported (turns end on EOS or length)"),
    "logprobs": (lambda v: not v, "log-probs are not returned"),
    "top_logprobs": (lambda v: not v, "log-probs are not returned"),
    "response_format": (
        lambda v: v in (None, {"type": "text"}),
        "only text responses (constrained decoding would change what the trainer scores)",
    ),
}


def _parse(body: Any) -> tuple[list[tuple[str, str]], int | None]:
    """The request's messages as (role, content) and its token limit; refuses what is not
    served (see the module)."""
    if not isinstance(body, dict):
        raise Refused("the request body must be a JSON object")
    for name, (supported, why) in _UNSUPPORTED.items():
        if not supported(body.get(name)):
            raise Refused(f"{name}={body[name]!r} is not supported: {why}", name)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise Refused(f"max_tokens={max_tokens!r} must be a positive integer", "max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Refused("messages must be a non-empty list", "messages")
    return [_message(i, m) for i, m in enumerate(messages)], max_tokens


def _message(index: int, message: Any) -> tuple[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise Refused(f"{where} must be an object with a role", "messages")
    if message.get("tool_calls") or message.get("function_call"):
        raise Refused(f"{where} has tool calls: function calling is not supported", "messages")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise Refused(f"{where}: only text content parts are supported", "messages")
        content = "".join(str(part.get("text", "")) for part in content)
    if not isinstance(content, str):
        raise Refused(f"{where} must have text content", "messages")
    return message["role"], content


FINISH_REASONS = {"stop": "stop", "length": "length", "limit": "length"}
"""The engine's finish reasons as the API's: an episode limit reads as `length`."""


def _completion(episode_id: str, body: dict, reply, context: int, turn: int) -> dict:
    return {
        "id": f"chatcmpl-{episode_id}-{turn}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or "sluice",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text},
                "finish_reason": FINISH_REASONS[reply.finish_reason],
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": context,
            "completion_tokens": len(reply.token_ids),
            "total_tokens": context + len(reply.token_ids),
        },
    }


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    """An OpenAI-style error; not to be retried (the `openai` client obeys x-should-retry)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    error = {"message": message, "type": kind, "param": param, "code": None}
    return web.json_response({"error": error}, status=status, headers={"x-should-retry": "false"})
