"""Learning-rate schedules: the formula, the refusals, and an exact resume on the torch backend.

The torch backend runs in this process on the built-in model (no Ray): k steps, a checkpoint,
a fresh backend that loads it and steps on, against one backend that never stopped. The
Megatron backend's resume is in tests/megatron/checkpoint_resume.py (variant `schedule`); the
driver's own resume, with a schedule, in tests/test_torch_resume.py.
"""

import math

import pytest
import torch

from config import UserError, load_config
from tests.test_torch_backend import response_tokens, rollout_batch
from training.lr_schedule import LrSchedule, ScheduleState
from training.torch_backend import TorchBackend


def schedule(style: str, warmup: int = 0, decay: int = 10) -> LrSchedule:
    return LrSchedule(lr=1.0, style=style, warmup_iters=warmup, min_lr=0.1, decay_iters=decay)


def test_warm_up_starts_above_zero_and_reaches_lr_at_its_last_step():
    s = schedule("constant", warmup=4)
    assert [s.lr_at(k) for k in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        # Steps 3..10 after a 2-step warm-up: the decay spans steps 2 -> 10 (8 steps).
        ("linear", [1.0 - 0.9 * p for p in (1 / 8, 4 / 8, 1.0)]),
        ("cosine", [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)) for p in (1 / 8, 4 / 8, 1.0)]),
        ("constant", [1.0, 1.0, 1.0]),
    ],
)
def test_decay_reaches_min_lr_at_lr_decay_iters_and_stays(style, expected):
    s = schedule(style, warmup=2)
    assert [s.lr_at(k) for k in (3, 6, 10)] == pytest.approx(expected, rel=1e-12)
    assert s.lr_at(2) == 1.0
    assert s.lr_at(11) == s.lr_at(50) == pytest.approx(1.0 if style == "constant" else 0.1)


def test_the_default_schedule_is_the_configured_lr_every_step_bit_for_bit():
    """Default config: every step's lr is the very float `train.lr`, so AdamW computes what it
    computed before schedules existed."""
    config = load_config(None, {"train.lr": "3e-4"})
    state = ScheduleState(LrSchedule.of(config))
    groups = [{"lr": 3e-4}, {"lr": 3e-4}]
    for _ in range(5):
        assert state.next_lr(groups) == 3e-4
        assert all(g["lr"] == 3e-4 for g in groups)


def test_lr_decay_iters_defaults_to_the_runs_optimizer_steps():
    config = load_config(None, {"num_steps": "7", "train.lr_decay_style": "linear"})
    assert LrSchedule.of(config).decay_iters == 7
    config = load_config(
        None,
        {
            "num_steps": "7",
            "train.lr_decay_style": "linear",
            "rollout.batch_size": "64",
            "train.global_batch_size": "16",
            "train.epochs": "2",
        },
    )
    assert LrSchedule.of(config).decay_iters == 7 * 4 * 2
    assert LrSchedule.of(config, saved_decay_iters=9).decay_iters == 9  # resumed: the saved one


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.lr_warmup_iters": "-1"}, "train.lr_warmup_iters=-1 must be >= 0"),
        (
            {"train.lr_decay_style": "cosine", "train.min_lr": "0.1", "train.lr": "0.01"},
            r"train.min_lr=0.1 must be in \[0, train.lr=0.01\]",
        ),
        ({"train.lr_decay_style": "WSD"}, "train.lr_decay_style='WSD' is not one of"),
        (
            {"train.lr_decay_style": "linear", "train.lr_decay_iters": "0"},
            "train.lr_decay_iters=0 must be >= 1",
        ),
        ({"train.min_lr": "1e-5"}, "train.min_lr=1e-05 has no effect with .*constant"),
        (
            {"train.lr_decay_style": "cosine", "num_steps": "3", "train.lr_warmup_iters": "3"},
            r"train.lr_decay_iters=3 \(unset: the run's optimizer steps\) must be above "
            r"train.lr_warmup_iters=3",
        ),
    ],
)
def test_bad_schedule_settings_are_refused_by_name(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def lr_config(**overrides):
    return load_config(
        None,
        {
            "num_steps": "5",
            "train.lr": "0.01",
            "train.lr_decay_style": "cosine",
            "train.lr_warmup_iters": "2",
            "train.min_lr": "0.001",
            **overrides,
        },
    )


def steps(backend: TorchBackend, batches, count: int) -> list[float]:
    return [backend.train(batches, response_tokens(batches)).lr for _ in range(count)]


def test_torch_backend_resumes_the_schedule_exactly(tmp_path):
    batches = [rollout_batch(3, 8)]
    device = torch.device("cpu")
    straight = TorchBackend(lr_config(), device)
    expected = steps(straight, batches, 5)
    assert expected == pytest.approx(
        [0.005, 0.01, 0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi / 3)), 0.00325, 0.001]
    )

    first = TorchBackend(lr_config(), device)
    assert steps(first, batches, 2) == expected[:2]
    first.save_checkpoint(str(tmp_path))
    resumed = TorchBackend(lr_config(), device)
    resumed.load_checkpoint(str(tmp_path), with_optimizer=True)
    assert steps(resumed, batches, 3) == expected[2:]
    weights = dict(straight.named_weights())
    for name, tensor in resumed.named_weights():
        assert torch.equal(tensor, weights[name]), name


def test_the_first_warm_up_step_moves_the_weights_by_its_share_of_lr():
    """Adam's first update is lr x g / (|g| + eps): with a 4-step warm-up, a quarter of the
    constant schedule's, so the schedule's lr is the one the optimizer steps with."""
    batches = [rollout_batch(3, 8)]
    moves = []
    for warmup in ("0", "4"):
        config = load_config(None, {"train.lr": "0.01", "train.lr_warmup_iters": warmup})
        backend = TorchBackend(config, torch.device("cpu"))
        before = {name: tensor.clone() for name, tensor in backend.named_weights()}
        steps(backend, batches, 1)
        moves.append(torch.cat([(t - before[n]).flatten() for n, t in backend.named_weights()]))
    constant, warming = moves
    assert constant.abs().max() > 1e-3
    torch.testing.assert_close(warming, constant / 4, rtol=1e-3, atol=1e-7)
