"""Truncated importance sampling: the weights, when it is on, and that the loss uses them.

The last test trains the torch backend on rows whose rollout log-probs are the trainer's own
shifted by known amounts, so every token's TIS weight is known: the step's policy loss and the
reported clip fraction must be exactly those of the weights.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from config import load_config
from config.errors import UserError
from config.schema import AlgorithmConfig
from data.schema import build_rollout_batch
from models.tiny import save_tiny_model
from rl.grpo import policy_loss, truncated_importance_weights
from training.backend import TrainStats
from training.loss import LossSettings
from training.torch_backend import TorchBackend

FP8_ENTRY = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


def test_weights_are_the_ratio_capped_and_carry_no_gradient():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -30.0]], requires_grad=True)
    rollout = torch.tensor([[-1.0, -3.0, -0.2, -2.0, 0.0]])
    tis = truncated_importance_weights(old, rollout, cap=2.0)
    expected = [1.0, 2.0, math.exp(-0.3), math.exp(-1.0), math.exp(-20.0)]  # e^1 > 2: capped
    assert tis.weights[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert tis.truncated.tolist() == [[False, True, False, False, False]]
    assert not tis.weights.requires_grad
    assert truncated_importance_weights(old, rollout, cap=3.0).weights[0, 1].item() == (
        pytest.approx(math.e, rel=1e-6)
    )
    with pytest.raises(ValueError, match="cap must be >= 1"):
        truncated_importance_weights(old, rollout, cap=0.5)


def test_a_floor_raises_the_smallest_weights_and_counts_as_truncation():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    rollout = torch.tensor([[-1.0, -3.0, -0.2, -0.5]])  # ratios 1, e, e^-0.3, e^-2.5
    tis = truncated_importance_weights(old, rollout, cap=2.0, floor=0.5)
    assert tis.weights[0].tolist() == pytest.approx([1.0, 2.0, math.exp(-0.3), 0.5], rel=1e-6)
    assert tis.truncated.tolist() == [[False, True, False, True]]
    with pytest.raises(ValueError, match=r"floor must be in \[0, 1\]"):
        truncated_importance_weights(old, rollout, cap=2.0, floor=1.5)
    with pytest.raises(UserError, match=r"algorithm.tis_floor=1.5 must be in \[0, 1\]"):
        load_config(None, {"algorithm.tis_floor": 1.5})
    settings = LossSettings.resolve(algorithm(tis="on", tis_floor=0.25), fp8_rollouts=False)
    assert (settings.tis, settings.tis_floor) == (True, 0.25)


def test_policy_loss_scales_each_tokens_loss_and_gradient_by_its_weight():
    log_probs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    advantages = torch.tensor([[1.0]])
    weights = torch.tensor([[2.0, 0.5, 1.0]])
    plain, _ = policy_loss(log_probs, log_probs.detach(), advantages, 0.2, 0.28)
    (grad_plain,) = torch.autograd.grad(plain.sum(), log_probs)
    weighted, _ = policy_loss(log_probs, log_probs.detach(), advantages, 0.2, 0.28, weights)
    (grad_weighted,) = torch.autograd.grad(weighted.sum(), log_probs)
    assert torch.equal(weighted, plain * weights)
    assert torch.allclose(grad_weighted, grad_plain * weights)


def algorithm(**fields) -> AlgorithmConfig:
    return AlgorithmConfig(**fields)


def test_tis_is_on_by_default_with_fp8_rollouts_and_off_otherwise():
    auto = LossSettings.resolve(algorithm(), fp8_rollouts=True)
    assert (auto.tis, auto.old_log_probs, auto.tis_cap) == (True, "recompute", 2.0)
    plain = LossSettings.resolve(algorithm(), fp8_rollouts=False)
    assert (plain.tis, plain.old_log_probs) == (False, "rollout")  # unchanged for bf16 runs
    forced = LossSettings.resolve(algorithm(tis="on", tis_cap=3.0), fp8_rollouts=False)
    assert (forced.tis, forced.old_log_probs, forced.tis_cap) == (True, "recompute", 3.0)
    off = LossSettings.resolve(algorithm(tis="off"), fp8_rollouts=True)
    assert (off.tis, off.old_log_probs) == (False, "rollout")
    recompute = LossSettings.resolve(algorithm(old_log_probs="recompute"), fp8_rollouts=False)
    assert (recompute.tis, recompute.old_log_probs) == (False, "recompute")
    # An explicit rollout ratio is the user's correction for the mismatch: auto adds none.
    rollout = LossSettings.resolve(algorithm(old_log_probs="rollout"), fp8_rollouts=True)
    assert (rollout.tis, rollout.old_log_probs) == (False, "rollout")


def test_tis_with_the_rollout_ratio_is_refused():
    with pytest.raises(UserError, match=r"TIS would correct the same .* a second time"):
        load_config(None, {"algorithm.tis": "on", "algorithm.old_log_probs": "rollout"}).validate()
    with pytest.raises(UserError, match=r"TIS would correct the same"):
        LossSettings.resolve(algorithm(tis="on", old_log_probs="rollout"), fp8_rollouts=True)
    with pytest.raises(UserError, match=r"algorithm.tis_cap=0.5 must be >= 1"):
        load_config(None, {"algorithm.tis_cap": "0.5"}).validate()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny model as the trainers' bf16 checkpoint, and a rollout directory whose
    config.json declares FP8 (all that the trainers read of it)."""
    root = tmp_path_factory.mktemp("tis")
    bf16, fp8 = root / "tiny", root / "tiny-FP8"
    save_tiny_model(bf16, 3)
    fp8.mkdir()
    config = json.loads((bf16 / "config.json").read_text())
    (fp8 / "config.json").write_text(json.dumps({**config, "quantization_config": FP8_ENTRY}))
    return bf16, fp8


def rows(rollout_log_probs: list[list[float]] | None = None):
    prompts = [[5, 6, 7, 13], [8, 9, 13], [3, 4, 5, 6, 13]]
    responses = [[4, 1], [7, 7, 1], [9]]
    advantages = [1.0, -0.5, 2.0]
    lps = rollout_log_probs or [[-1.0] * len(r) for r in responses]
    return build_rollout_batch(
        {
            "prompt_ids": prompts,
            "response_ids": responses,
            "rollout_log_probs": lps,
            "loss_mask": [[1] * len(r) for r in responses],
            "reward": [1.0, 0.0, 1.0],
            "advantage": advantages,
            "group_id": [0, 0, 1],
            "sample_index": [0, 1, 0],
            "weight_version": [0, 0, 0],
            "finish_reason": ["stop", "stop", "length"],
        }
    ), advantages


SHIFTS = [[1.0, -0.5], [0.0, 1.0, -0.5], [1.0]]
"""log pi_trainer - log pi_rollout per token: e^1 > cap 2 (truncated), e^-0.5, 1."""


def train_on_shifted_rollouts(backend: TorchBackend):
    """One step on `rows()` whose rollout log-probs are the backend's own minus SHIFTS:
    (its stats, the rows' advantages, the number of tokens)."""
    batch, advantages = rows()
    own = backend.compute_log_probs([batch])
    shifted = [(lp - torch.tensor(s)).tolist() for lp, s in zip(own, SHIFTS, strict=True)]
    batch, _ = rows(shifted)
    tokens = sum(len(s) for s in SHIFTS)
    return backend.train([batch], normalizer=tokens), advantages, tokens


def test_the_loss_is_weighted_by_tis_and_reports_its_clip_fraction(dirs):
    bf16, fp8 = dirs
    config = load_config(
        None,
        {
            "model.hf_checkpoint": str(fp8),
            "model.train_checkpoint": str(bf16),
            "train.grad_clip": "0",
        },
    )
    backend = TorchBackend(config, torch.device("cpu"))
    assert backend.loss_settings.tis and backend.loss_settings.old_log_probs == "recompute"
    stats, advantages, tokens = train_on_shifted_rollouts(backend)

    weights = [[min(math.exp(d), 2.0) for d in s] for s in SHIFTS]
    # ratio = pi / pi_old_trainer = 1 exactly, so each token's loss is -A x w
    expected = -sum(a * w for a, ws in zip(advantages, weights, strict=True) for w in ws) / tokens
    assert stats.policy_loss == pytest.approx(expected, rel=1e-5)
    unweighted = -sum(a * len(s) for a, s in zip(advantages, SHIFTS, strict=True)) / tokens
    assert stats.policy_loss != pytest.approx(unweighted, rel=1e-3)
    metrics = TrainStats.reduce([stats])
    assert metrics["mismatch/tis_clip_fraction"] == pytest.approx(3 / tokens)
    assert metrics["mismatch/tis_weight_mean"] == pytest.approx(
        sum(map(sum, weights)) / tokens, rel=1e-5
    )
    mean_shift = sum(abs(d) for s in SHIFTS for d in s) / tokens
    assert metrics["mismatch/logprob_abs_diff_mean"] == pytest.approx(mean_shift, rel=1e-4)


def test_without_fp8_the_loss_is_unweighted_and_reports_no_tis(dirs):
    bf16, _ = dirs
    config = load_config(
        None,
        {"model.hf_checkpoint": str(bf16), "algorithm.old_log_probs": "recompute"},
    )
    backend = TorchBackend(config, torch.device("cpu"))
    assert not backend.loss_settings.tis
    stats, advantages, tokens = train_on_shifted_rollouts(backend)
    expected = -sum(a * len(s) for a, s in zip(advantages, SHIFTS, strict=True)) / tokens
    assert stats.policy_loss == pytest.approx(expected, rel=1e-5)
    assert "mismatch/tis_clip_fraction" not in TrainStats.reduce([stats])
