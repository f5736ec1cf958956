"""Rollout routing replay (R3) on the CPU: the transformers engine records each token's experts,
they travel in the Arrow batch, and the torch backend forces them in its forward.

The built-in model in fp32 routes identically in the engine and the trainer, so a run of the
loop with R3 on the CPU (tests/test_algorithms.py) shows only that replay does not break
training, not that it replays anything. A mismatch is made here instead, at one named point
(`perturb_routers`): the engine's router weights are perturbed (as fp8 / bf16 kernels perturb
them on a GPU), so that the engine picks other experts for some tokens; with R3 the trainer's
forwards (its log-prob pass and its training step) take the engine's experts, without R3 its own.
"""

import functools

import numpy as np
import pytest
import torch

import driver
from config.errors import UserError
from data.schema import build_rollout_batch
from inference import create_engine
from inference.engine import Completion, SamplingParams
from models.routing import (
    RoutingRecorder,
    moe_routers,
    replay_routing,
    replay_routing_shape,
)
from models.tiny import build_tiny_model
from training.backend import TrainStats
from training.torch_backend import TorchBackend

CPU = torch.device("cpu")
PROMPTS = [[3, 4, 5, 13, 6], [7, 8, 13, 9], [4, 4, 13]] * 8  # ragged: left padding in generate


def config(replay: bool, *extra: str):
    return driver.parse_args(["--algorithm.routing_replay", str(replay).lower(), *extra])[0]


def perturb_routers(model: torch.nn.Module, scale: float, seed: int = 0) -> None:
    """The test's one point of engine/trainer mismatch: Gaussian noise of std `scale` added to
    every router weight of `model` (an engine's), so it routes some tokens to other experts."""
    noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in moe_routers(model):
            router.weight += scale * torch.randn(router.weight.shape, generator=noise)


@functools.cache  # the tests only read the completions: one generation per noise level
def generate(router_noise: float) -> tuple[list[Completion], object]:
    """Completions of PROMPTS by an engine recording routing, its routers perturbed."""
    engine = create_engine(config(True), CPU)
    perturb_routers(engine.model, router_noise)
    torch.manual_seed(1)
    return engine.generate(PROMPTS, SamplingParams(max_new_tokens=8)), engine


def rollout_batch(completions: list[Completion]):
    """The Arrow batch a rollout actor builds of these completions."""
    n = len(completions)
    return build_rollout_batch(
        {
            "prompt_ids": PROMPTS,
            "response_ids": [c.token_ids for c in completions],
            "rollout_log_probs": [c.log_probs for c in completions],
            "loss_mask": [[1] * len(c.token_ids) for c in completions],
            "reward": [0.0] * n,
            "advantage": [0.0] * n,
            "group_id": list(range(n)),
            "sample_index": [0] * n,
            "weight_version": [0] * n,
            "finish_reason": [c.finish_reason for c in completions],
            "routed_experts": [c.routed_experts for c in completions],
        }
    )


def routes_of(recorder: RoutingRecorder, completions) -> list[np.ndarray]:
    """The experts a trainer's routers picked in its one forward of the batch, for each row's
    fed positions ([positions, layers, top_k], as the engine records them)."""
    (call,) = recorder.calls  # one micro-batch, one forward
    width = max(len(p) + len(c.token_ids) for p, c in zip(PROMPTS, completions, strict=True))
    picked = torch.stack(call, dim=1).view(len(completions), width, len(call), -1)
    return [
        picked[b, : len(p) + len(c.token_ids) - 1].numpy()
        for b, (p, c) in enumerate(zip(PROMPTS, completions, strict=True))
    ]


def trainer_pass(completions, replay: bool):
    """The trainer's mean |log-prob - engine log-prob| over the batch, and its experts."""
    backend = TorchBackend(config(replay), CPU)
    with RoutingRecorder(backend.model) as recorder:
        log_probs = backend.compute_log_probs([rollout_batch(completions)])
    mismatch = torch.cat(
        [lp - torch.tensor(c.log_probs) for lp, c in zip(log_probs, completions, strict=True)]
    )
    return mismatch.abs().mean().item(), routes_of(recorder, completions)


def training_step(completions, replay: bool):
    """One optimizer step of a fresh trainer on the batch: the log-prob mismatch it reports
    (its loss forward's against the engine's) and the experts of that forward."""
    backend = TorchBackend(config(replay), CPU)
    tokens = float(sum(len(c.token_ids) for c in completions))
    with RoutingRecorder(backend.model) as recorder:
        stats = backend.train([rollout_batch(completions)], normalizer=tokens)
    reported = TrainStats.reduce([stats])["mismatch/logprob_abs_diff_mean"]
    return reported, routes_of(recorder, completions)


def agreement(routes: list[np.ndarray], engine_routes: list[np.ndarray]) -> float:
    """The fraction of (position, layer) pairs routed to the engine's set of experts."""
    pairs = [same_experts(r, e).ravel() for r, e in zip(routes, engine_routes, strict=True)]
    return float(np.concatenate(pairs).mean())


def same_experts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per position and layer: the same set of experts (top-k order may differ)."""
    return (np.sort(a, axis=-1) == np.sort(b, axis=-1)).all(axis=-1)


def test_the_engine_records_every_fed_position_as_a_full_forward_routes_it():
    completions, engine = generate(router_noise=0.0)
    shape = replay_routing_shape(config(True))
    assert (shape.layers, shape.top_k, shape.num_experts) == (2, 2, 8)
    for prompt, completion in zip(PROMPTS, completions, strict=True):
        sequence = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad(), RoutingRecorder(engine.model) as recorder:
            engine.model(input_ids=sequence)
        full = torch.stack(recorder.calls[0], dim=1).numpy()[:-1]  # the last token is not fed
        assert completion.routed_experts.dtype == np.uint8
        assert completion.routed_experts.shape == full.shape
        assert same_experts(completion.routed_experts, full).all()


def test_replaying_the_engines_own_routing_changes_nothing():
    completions, _ = generate(router_noise=0.0)
    free, free_routes = trainer_pass(completions, replay=False)
    replayed, _ = trainer_pass(completions, replay=True)
    assert free < 1e-6 and replayed < 1e-6  # fp32, same weights: same log-probs either way
    assert all(
        same_experts(r, c.routed_experts).all()
        for r, c in zip(free_routes, completions, strict=True)
    )


def test_replay_makes_the_trainer_route_like_the_engine_and_shrinks_the_mismatch():
    completions, _ = generate(router_noise=0.01)
    free, free_routes = trainer_pass(completions, replay=False)
    replayed, replayed_routes = trainer_pass(completions, replay=True)
    engine_routes = [c.routed_experts for c in completions]
    # the perturbation moves the trainer off the engine's experts
    assert agreement(free_routes, engine_routes) < 0.95
    for routes, engine in zip(replayed_routes, engine_routes, strict=True):
        np.testing.assert_array_equal(routes, engine)  # every token, every layer, in order
    # What is left is the perturbed gate weights at the same experts: several times smaller.
    assert replayed < free / 4, (free, replayed)


def test_the_training_step_forward_takes_the_engines_experts_only_with_replay():
    """The loss's own forward (`train`, the one the gradient flows through), not only the
    log-prob pass: with R3 it routes exactly as the engine did; without, as the trainer's
    routers pick, which under the perturbation differs for a measurable share of tokens; and
    the mismatch the step reports shrinks with replay."""
    completions, _ = generate(router_noise=0.01)
    engine_routes = [c.routed_experts for c in completions]
    free, free_routes = training_step(completions, replay=False)
    replayed, replayed_routes = training_step(completions, replay=True)
    assert agreement(free_routes, engine_routes) < 0.95
    for routes, engine in zip(replayed_routes, engine_routes, strict=True):
        np.testing.assert_array_equal(routes, engine)
    assert replayed < free / 4, (free, replayed)


@pytest.mark.parametrize("normalized", [True, False])
def test_replayed_router_weights_are_the_softmax_at_the_given_experts_with_gradients(normalized):
    model = build_tiny_model(seed=3)
    model.config.norm_topk_prob = normalized
    for router in moe_routers(model):
        router.norm_topk_prob = normalized
    ids = torch.tensor([[3, 4, 5, 13, 6, 7]])
    forced = torch.randint(0, 8, (1, 6, 2, 1)).expand(1, 6, 2, 2).clone()
    forced[..., 1] = (forced[..., 0] + 1 + torch.randint(0, 7, (1, 6, 2))) % 8  # two distinct
    seen: list[tuple] = []  # per router: its input and (logits, weights, experts)
    routers = moe_routers(model)
    handles = [r.register_forward_hook(lambda m, i, o: seen.append((i[0], o))) for r in routers]
    with replay_routing(model, forced):
        model(input_ids=ids).logits.sum().backward()
    for handle in handles:
        handle.remove()
    for layer, (router, (inputs, (_, weights, experts))) in enumerate(
        zip(routers, seen, strict=True)
    ):
        expected_experts = forced[0, :, layer]
        probs = torch.softmax(inputs.reshape(-1, 64) @ router.weight.T, dim=-1)
        expected = probs.gather(-1, expected_experts)
        if normalized:
            expected = expected / expected.sum(-1, keepdim=True)
        torch.testing.assert_close(experts, expected_experts)
        torch.testing.assert_close(weights, expected)
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert all("forward" not in vars(r) for r in routers)  # the class's forward is back


def test_routing_replay_refusals(tmp_path, capsys):
    with pytest.raises(UserError, match="static batching only"):
        config(True, "--rollout.batching", "continuous")
    from transformers import Qwen3Config

    dense = Qwen3Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=4)
    dense.save_pretrained(tmp_path)
    argv = ["--use-rollout-routing-replay", "--model.hf_checkpoint", str(tmp_path), "--dry-run"]
    assert driver.main(argv) == 2  # before any actor starts
    err = capsys.readouterr().err
    assert err.startswith("error: algorithm.routing_replay=true") and "has none" in err
