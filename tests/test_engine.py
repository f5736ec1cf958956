"""The transformers engine: sampled tokens, their log-probs, stop handling, both batching modes."""

import pytest
import torch

from inference.engine import SamplingParams
from inference.transformers_engine import TransformersEngine
from models.tiny import build_tiny_model, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def make_engine(tokenizer, batching: str) -> TransformersEngine:
    return TransformersEngine(
        build_tiny_model(seed=7), tokenizer.eos_token_id, tokenizer.pad_token_id, batching=batching
    )


def reference_log_probs(
    model, prompt: list[int], response: list[int], temperature: float
) -> torch.Tensor:
    """Full-sequence forward (no KV cache, no padding): what a trainer computes."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return log_probs.gather(-1, torch.tensor(response)[:, None])[:, 0]


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_log_probs_match_a_full_forward(tokenizer, batching):
    engine = make_engine(tokenizer, batching)
    # Prompts of different lengths: static batching left-pads them.
    prompts = [tokenizer.encode(t) for t in ["1 2 3 4 =", "5 6 =", "7 =", "0 0 0 0 0 0 ="]] * 3
    torch.manual_seed(0)
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.7))
    assert len(completions) == len(prompts)
    for prompt, completion in zip(prompts, completions, strict=True):
        assert 1 <= len(completion.token_ids) <= 6
        assert len(completion.log_probs) == len(completion.token_ids)
        expected = reference_log_probs(engine.model, prompt, completion.token_ids, 0.7)
        assert (expected - torch.tensor(completion.log_probs)).abs().max().item() < 1e-5


def test_responses_stop_after_eos_and_say_why(tokenizer):
    engine = make_engine(tokenizer, "static")
    prompts = [tokenizer.encode("3 1 4 1 =")] * 32
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=4))
    eos = tokenizer.eos_token_id
    reasons = set()
    for c in completions:
        reasons.add(c.finish_reason)
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1]
        else:
            assert len(c.token_ids) == 4 and eos not in c.token_ids
    assert reasons == {"stop", "length"}  # a random model does both at this length


def test_greedy_decoding_is_deterministic(tokenizer):
    engine = make_engine(tokenizer, "static")
    prompts = [tokenizer.encode("9 8 7 6 =")] * 4
    first = engine.generate(prompts, SamplingParams(max_new_tokens=3, greedy=True))
    second = engine.generate(prompts, SamplingParams(max_new_tokens=3, greedy=True))
    assert [c.token_ids for c in first] == [c.token_ids for c in second]
    assert len({tuple(c.token_ids) for c in first}) == 1
