"""Multi-turn episodes (rl/episodes.py) through Sluice's SGLang path, driven as a real SGLang
server would be: each turn one `/generate` on the episode's exact token sequence so far.

The engine is `SglangEngine` as a rollout actor holds it once its server is up: its own
`generate` over a real `SglangClient` (its constructor would launch `sglang.launch_server`,
which cannot run here). The server is `EpisodeServer`, a test double built on
tests/test_sglang_client.py's `FakeServer`: it admits every `/generate` body the way sglang's
server does (tests/test_sglang_requests.py's `admitted_generate`, then each prompt's
`SamplingParams` built, normalised and verified by sglang's own class) and answers by a rule of
the input ids and the request's seed (`sampled_turn`, `turn_routing`), the routed experts
encoded by sglang's own capturer classes with a slot per decoder layer, so the test recomputes
what every turn returned.
"""

import json
import zlib
from dataclasses import dataclass

import numpy as np
import pytest

from config.schema import SluiceConfig
from data.prompts import PromptRecord
from inference.engine import SamplingParams
from inference.sglang import requests as req
from inference.sglang.client import SglangClient
from inference.sglang.engine import SglangEngine
from models.loading import load_tokenizer
from models.routing import RoutingShape, routing_shape
from rl.environments import Episode, Limits
from rl.episodes import EpisodeRunner
from tests.test_sglang_client import FakeServer
from tests.test_sglang_requests import (  # (sglang's classes, imported as those tests do)
    FINISH_LENGTH,
    admitted_generate,
    sglang_output,
    sglang_routed_experts,
    sglang_sampling_params,
)

pytestmark = pytest.mark.sglang

WORDS = list(range(3, 14))
"""The built-in tokenizer's digits and `=`: no special token, so every turn runs to its
length."""

MAX_STEP_SEED = 2**31 - 1
"""The largest step seed the rollout group draws (`hash(...) & 0x7FFFFFFF`)."""

LIMITS = Limits(max_turns=2, max_tokens=12, max_tool_calls=0, max_new_tokens=3)
"""Prompts of 2-5 tokens, a 3-token turn and a 2-token observation: the second turn of the
longest prompt has room for 2 tokens only, so the second round of turns goes to the engine as
two calls (one per max_new_tokens) of ragged prompts."""

RECORDS = [
    PromptRecord(text, label, "test")
    for text, label in [("1 2", "3"), ("3 4 5", "6"), ("6 7 8 9", "0"), ("9 8 7 6 5", "4")]
]


DECODER_LAYERS, MOE_LAYERS = 3, [1, 2]
"""The served model's decoder layers, and those that are MoE (SGLang's buffer has a slot for
each decoder layer; a dense layer's slot is never written)."""


def routing_with_a_dense_layer() -> RoutingShape:
    """The routing shape Sluice reads from a Qwen3-MoE whose first decoder layer is dense."""
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        num_hidden_layers=DECODER_LAYERS, mlp_only_layers=[0], num_experts=8, num_experts_per_tok=2
    )
    return routing_shape(config)


class ObserveBetweenTurns:
    """A turn, the record's label and `=` as an observation, a second turn."""

    async def run(self, episode: Episode) -> float:
        await episode.generate()
        episode.observe(observation_text(episode.record))
        await episode.generate()
        return 1.0


def observation_text(record: PromptRecord) -> str:
    return f"{record.label} ="


# --- the server's rule ------------------------------------------------------------------------


def draw(*key) -> int:
    return zlib.crc32(json.dumps(key).encode())


def sampled_turn(input_ids: list[int], seed: int, max_new_tokens: int):
    """(tokens, log-probs) a turn on `input_ids` returns: each token drawn from the context and
    the request's seed (two samples of one prompt differ, as seeded SGLang requests do)."""
    tokens, log_probs = [], []
    for _ in range(max_new_tokens):
        context = input_ids + tokens
        token = WORDS[draw("token", seed, context) % len(WORDS)]
        log_probs.append(-(1 + draw("log-prob", context, token) % 1000) / 100)
        tokens.append(token)
    return tokens, log_probs


def turn_routing(input_ids: list[int], tokens: list[int], shape: RoutingShape) -> np.ndarray:
    """A turn's routing [input + output - 1 positions, MoE layers, top_k]: each position's
    experts follow from the tokens up to it and from the turn's input length, so a position
    two turns share is routed differently in each (as prefill and decode numerics differ)."""
    sequence = input_ids + tokens
    routing = np.zeros((len(sequence) - 1, shape.layers, shape.top_k), dtype=np.int64)
    for position in range(len(sequence) - 1):
        for layer in range(shape.layers):
            key = ("experts", len(input_ids), layer, sequence[: position + 1])
            first = draw(*key) % shape.num_experts
            routing[position, layer] = [(first + k) % shape.num_experts for k in range(shape.top_k)]
    return routing


class EpisodeServer(FakeServer):
    """A stand-in SGLang server (test double): admits each `/generate` body as sglang's server
    does (a refused body is answered HTTP 400 with sglang's reason) and answers by the rule."""

    def __init__(self, routing: RoutingShape):
        super().__init__()
        self.routing = routing

    def reply(self, path: str, body: dict) -> tuple[int, object]:
        if path != req.GENERATE:
            return super().reply(path, body)
        try:
            obj = admitted_generate(body)
            params = [sglang_sampling_params(sp) for sp in obj.sampling_params]
        except (AssertionError, ValueError, TypeError) as error:
            return 400, {"error": f"sglang refuses the body: {type(error).__name__}: {error}"}
        return 200, [
            self.answer(obj, i, params[i].sampling_seed, params[i].max_new_tokens)
            for i in range(obj.batch_size)
        ]

    def answer(self, obj, i: int, seed: int, max_new_tokens: int) -> dict:
        input_ids = obj.input_ids[i]
        tokens, log_probs = sampled_turn(input_ids, seed, max_new_tokens)
        out = sglang_output(obj.rid[i], tokens, log_probs, FINISH_LENGTH(length=len(tokens)))
        out["meta_info"]["prompt_tokens"] = len(input_ids)
        if not obj.return_logprob[i]:
            del out["meta_info"]["output_token_logprobs"]
        if obj.return_routed_experts:
            routing = turn_routing(input_ids, tokens, self.routing)
            per_moe_layer = {layer: routing[:, m].tolist() for m, layer in enumerate(MOE_LAYERS)}
            out["meta_info"]["routed_experts"] = sglang_routed_experts(
                DECODER_LAYERS, per_moe_layer, len(input_ids)
            )
        return out


# --- the test ---------------------------------------------------------------------------------


@dataclass
class SentTurn:
    """One prompt of one `/generate` body, as sglang's server reads it."""

    input_ids: list[int]
    seed: int | None
    max_new_tokens: int


def sent_turns(bodies: list[dict], routing_replay: bool) -> list[SentTurn]:
    """Every prompt the server was sent; each body asked for log-probs of the output tokens
    (and routed experts, with routing replay) on token ids, never text."""
    turns = []
    for body in bodies:
        if "input_ids" not in body:
            continue  # (an /abort_request: none is expected)
        obj = admitted_generate(body)
        assert obj.text is None and "text" not in body
        assert obj.return_logprob == [True] * obj.batch_size
        assert obj.logprob_start_len == [-1] * obj.batch_size
        assert bool(obj.return_routed_experts) == routing_replay
        for input_ids, sp in zip(obj.input_ids, obj.sampling_params, strict=True):
            params = sglang_sampling_params(sp)
            turns.append(SentTurn(input_ids, params.sampling_seed, params.max_new_tokens))
    return turns


def serving_engine(url: str, routing: RoutingShape | None) -> SglangEngine:
    """`SglangEngine` with its server up at `url`, its client as its constructor builds it."""
    settings = SluiceConfig().rollout.sglang
    engine = object.__new__(SglangEngine)  # (its constructor launches the server)
    engine.url, engine.peers = url, []
    engine.client = SglangClient(
        [url], settings.request_timeout_s, settings.max_inflight_per_engine, routing=routing
    )
    return engine


def take(sent: list[SentTurn], input_ids: list[int], tokens: list[int]) -> SentTurn:
    """The turn sent on exactly `input_ids` whose answer begins with `tokens` (the samples of one
    prompt share their first input), taken off `sent`."""
    for k, turn in enumerate(sent):
        answered, _ = sampled_turn(turn.input_ids, turn.seed, turn.max_new_tokens)
        if turn.input_ids == input_ids and answered == tokens[: len(answered)]:
            return sent.pop(k)
    raise AssertionError(f"no /generate on exactly {input_ids} answered {tokens}")


@pytest.mark.parametrize("routing_replay", [True, False], ids=["routing-replay", "no-replay"])
def test_each_turn_is_a_generate_on_the_episodes_own_tokens(routing_replay):
    tokenizer = load_tokenizer(SluiceConfig().model)
    routing = routing_with_a_dense_layer()
    records = [r for r in RECORDS for _ in range(2)]  # two samples a prompt, as GRPO's groups
    prompt_ids = [tokenizer.encode(r.text) for r in records]
    server = EpisodeServer(routing)
    try:
        engine = serving_engine(server.url, routing if routing_replay else None)
        environment = "tests.test_sglang_episodes:ObserveBetweenTurns"
        runner = EpisodeRunner(environment, engine, tokenizer, LIMITS, None)
        params = SamplingParams(LIMITS.max_new_tokens, 1.0, seed=MAX_STEP_SEED)
        outcomes = runner.run(records, prompt_ids, params)
    finally:
        server.kill()

    sent = sent_turns(server.bodies, routing_replay)
    seeds = [turn.seed for turn in sent]
    assert None not in seeds and len(set(seeds)) == len(seeds) == 2 * len(records)
    second_lengths = {t.max_new_tokens for t in sent if t.input_ids not in prompt_ids}
    assert second_lengths == {2, 3}  # the second round went as two engine calls

    for prompt, record, outcome in zip(prompt_ids, records, outcomes, strict=True):
        c = outcome.completion
        first = take(sent, prompt, c.token_ids)
        tokens1, log_probs1 = sampled_turn(prompt, first.seed, first.max_new_tokens)
        observation = tokenizer.encode(observation_text(record), add_special_tokens=False)
        n1, n_obs = len(tokens1), len(observation)
        # the second turn: a /generate on exactly prompt, first turn and observation
        second = take(sent, prompt + tokens1 + observation, c.token_ids[n1 + n_obs :])
        assert first.max_new_tokens == LIMITS.max_new_tokens
        room = LIMITS.max_tokens - len(second.input_ids)
        assert second.max_new_tokens == min(LIMITS.max_new_tokens, room)
        tokens2, log_probs2 = sampled_turn(second.input_ids, second.seed, second.max_new_tokens)

        n2 = len(tokens2)
        assert c.token_ids == tokens1 + observation + tokens2
        assert c.loss_mask == [1] * n1 + [0] * n_obs + [1] * n2
        assert c.log_probs == log_probs1 + [0.0] * n_obs + log_probs2
        assert c.turn_starts == [0, n1 + n_obs]
        assert (c.finish_reason, c.weight_version) == ("length", 0)
        assert outcome.counts.turns == 2 and outcome.end_reason is None

        if not routing_replay:
            assert c.routed_experts is None
            continue
        p = len(prompt)
        routing1 = turn_routing(prompt, tokens1, routing)
        routing2 = turn_routing(second.input_ids, tokens2, routing)
        assert c.routed_experts.shape == (p + len(c.token_ids) - 1, routing.layers, routing.top_k)
        # positions p-1 .. p+n1-2 sampled the first turn's tokens: the first turn's routing
        chose_turn1 = slice(p - 1, p + n1 - 1)
        np.testing.assert_array_equal(c.routed_experts[chose_turn1], routing1[chose_turn1])
        assert (routing1[chose_turn1] != routing2[chose_turn1]).any()  # (the turns differ)
        # every other position: the second turn's (its prefill, then its own tokens' decode)
        expected = routing2.copy()
        expected[chose_turn1] = routing1[chose_turn1]
        np.testing.assert_array_equal(c.routed_experts, expected)
    assert not sent  # no other /generate was made
