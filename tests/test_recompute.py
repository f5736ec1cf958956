"""Activation recompute (train.recompute_*; slime's --recompute-granularity / --recompute-method
/ --recompute-num-layers) on the torch backend: gradient checkpointing of decoder layers runs
their forward again in the backward, and changes neither the loss nor the gradients, in fp32
on the CPU, with routing replay (R3) too; and the combinations that cannot hold are refused."""

import re

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from config import load_config
from config.errors import UserError
from tests.megatron.layouts import rollout_rows
from training import check_backend_config
from training.torch_backend import TorchBackend

FULL = {"train.recompute_granularity": "full"}
BLOCK_OF_ONE = {**FULL, "train.recompute_method": "block", "train.recompute_num_layers": "1"}


def backend(**overrides) -> TorchBackend:
    # Several micro-batches (a 40-token budget); clip off, so the gradient norm is the raw one.
    base = {"train.grad_clip": "0", "train.max_tokens_per_micro_batch": "40", "train.lr": "0.01"}
    return TorchBackend(load_config(None, {**base, **overrides}), torch.device("cpu"))


def layer_calls(trainer: TorchBackend) -> list[int]:
    """Counts, per decoder layer, the forwards it runs from now on (a recomputed layer runs
    twice per micro-batch: in the forward and again in the backward)."""
    layers = [m for m in trainer.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    calls = [0] * len(layers)

    def counter(index):
        def count(module, inputs):
            calls[index] += 1

        return count

    # A pre-hook: torch stops a recomputed forward once it has what the backward needs, so a
    # hook at the forward's end would not see the recompute.
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(counter(index))
    return calls


def train_once(trainer: TorchBackend, batches) -> tuple[object, dict[str, torch.Tensor]]:
    tokens = float(sum(b.column("loss_mask").flatten().to_numpy().sum() for b in batches))
    stats = trainer.train(batches, tokens)
    return stats, {name: w.clone() for name, w in trainer.named_weights()}


@pytest.mark.parametrize("replay", [False, True], ids=["plain", "r3"])
def test_recompute_changes_neither_loss_nor_gradients(replay):
    """Bit for bit: the recomputed forward is the same arithmetic on the same inputs. Under
    R3 the recomputed routers must take the engine's experts again (the replay spans the
    backward); routing on their own, the gradients would differ."""
    batches = rollout_rows()  # random experts recorded per position, read under R3
    extra = {"algorithm.routing_replay": "true"} if replay else {}
    results, calls = {}, {}
    for name, overrides in (("off", {}), ("full", FULL), ("block", BLOCK_OF_ONE)):
        trainer = backend(**extra, **overrides)
        calls[name] = layer_calls(trainer)
        results[name] = train_once(trainer, batches)
    (stats, weights) = results["off"]
    for name in ("full", "block"):
        assert results[name][0].loss == stats.loss
        assert results[name][0].grad_norm == stats.grad_norm
        for key, weight in weights.items():
            assert torch.equal(results[name][1][key], weight), (name, key)
    micro_batches = stats.micro_batches
    assert micro_batches > 1
    assert calls["off"] == [micro_batches] * 2  # the built-in model's two decoder layers
    assert calls["full"] == [2 * micro_batches] * 2
    assert calls["block"] == [2 * micro_batches, micro_batches]  # only the first layer


def test_replay_without_recompute_is_not_the_free_routing():
    """The R3 case above compares like with like: replay changes the update here."""
    batches = rollout_rows()
    free = train_once(backend(**FULL), batches)[0]
    replayed = train_once(backend(**FULL, **{"algorithm.routing_replay": "true"}), batches)[0]
    assert replayed.grad_norm != pytest.approx(free.grad_norm, rel=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"train.recompute_granularity": "selective"},
            "train.recompute_granularity=selective (core attention only) is megatron-core's",
        ),
        (
            {**FULL, "train.recompute_num_layers": "2"},
            "train.recompute_num_layers=2 with train.recompute_method=uniform",
        ),
    ],
)
def test_the_torch_backend_refuses_what_it_cannot_recompute(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        check_backend_config(load_config(None, overrides))


def test_r3_with_recompute_under_pipeline_parallelism_is_refused_at_start_up():
    """megatron-core's replay feeds each router the ids of the micro-batch whose forward ran
    last; under 1F1B a recomputed micro-batch's backward comes after later forwards."""
    megatron = {
        "train.backend": "megatron",
        "train.num_workers": "2",
        "train.parallel.pipeline": "2",
        "algorithm.routing_replay": "true",
    }
    check_backend_config(load_config(None, megatron))  # without recompute: replays
    check_backend_config(load_config(None, {**megatron, **FULL, "train.parallel.pipeline": "1"}))
    with pytest.raises(UserError) as error:
        check_backend_config(load_config(None, {**megatron, **FULL}))
    message = str(error.value)
    for field in ("algorithm.routing_replay", "train.recompute_granularity", "pipeline=2"):
        assert field in message, message


def test_recompute_settings_only_apply_with_full():
    with pytest.raises(UserError, match=r"apply only with train\.recompute_granularity=full"):
        load_config(None, {"train.recompute_method": "block"})


def test_slimes_recompute_flags_set_the_keys():
    import driver

    flags = ["--recompute-granularity", "full", "--recompute-method", "block"]
    config, _ = driver.parse_args([*flags, "--recompute-num-layers", "2"])
    t = config.train
    assert (t.recompute_granularity, t.recompute_method, t.recompute_num_layers) == (
        "full",
        "block",
        2,
    )


def test_a_block_of_more_layers_than_the_model_has_is_refused():
    overrides = {**FULL, "train.recompute_method": "block", "train.recompute_num_layers": "3"}
    with pytest.raises(UserError, match="the model has 2 decoder layers"):
        TorchBackend(load_config(None, overrides), torch.device("cpu"))
