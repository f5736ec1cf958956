"""Rollout routing replay (R3) on the CPU: the transformers engine records each token's experts,
they travel in the Arrow batch, and the torch backend forces them in its forward.

The built-in model in fp32 routes identically in the engine and the trainer, so a mismatch is
made the honest way the issue allows: the engine's router weights are perturbed (as fp8 / bf16
kernels perturb them on a GPU), so that the engine picks other experts for some tokens.
"""

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
from training.torch_backend import TorchBackend

CPU = torch.device("cpu")
PROMPTS = [[3, 4, 5, 13, 6], [7, 8, 13, 9], [4, 4, 13]] * 8  # ragged: left padding in generate


def config(replay: bool, *extra: str):
    return driver.parse_args(["--algorithm.routing_replay", str(replay).lower(), *extra])[0]


def generate(router_noise: float) -> tuple[list[Completion], object]:
    """Completions of PROMPTS by an engine recording routing, its routers perturbed."""
    engine = create_engine(config(True), CPU)
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for router in moe_routers(engine.model):
            router.weight += router_noise * torch.randn(router.weight.shape, generator=noise)
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


def trainer_pass(completions, replay: bool):
    """The trainer's log-probs of the batch, and the experts its routers picked for each row's
    fed positions ([positions, layers, top_k], as the engine records them)."""
    backend = TorchBackend(config(replay), CPU)
    with RoutingRecorder(backend.model) as recorder:
        log_probs = backend.compute_log_probs([rollout_batch(completions)])
    (call,) = recorder.calls  # one micro-batch
    width = max(len(p) + len(c.token_ids) for p, c in zip(PROMPTS, completions, strict=True))
    picked = torch.stack(call, dim=1).view(len(completions), width, len(call), -1)
    routes = [
        picked[b, : len(p) + len(c.token_ids) - 1].numpy()
        for b, (p, c) in enumerate(zip(PROMPTS, completions, strict=True))
    ]
    mismatch = torch.cat(
        [lp - torch.tensor(c.log_probs) for lp, c in zip(log_probs, completions, strict=True)]
    )
    return mismatch.abs().mean().item(), routes


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
    free_agree = np.concatenate(
        [same_experts(r, e).ravel() for r, e in zip(free_routes, engine_routes, strict=True)]
    )
    assert free_agree.mean() < 0.95  # the perturbation moves the trainer off the engine's experts
    for routes, engine in zip(replayed_routes, engine_routes, strict=True):
        np.testing.assert_array_equal(routes, engine)  # every token, every layer, in order
    # What is left is the perturbed gate weights at the same experts: several times smaller.
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
