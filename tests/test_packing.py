"""Packed micro-batches (`train.pack_sequences`): the rows back to back in one row, each with its
own positions and attending only to itself, against the right-padded micro-batches they
replace: the same layout for the loss, the same log-probs, loss and gradients, and under
routing replay only the rows' own routing replayed."""

import random

import numpy as np
import pytest
import torch

from data.schema import build_rollout_batch
from models.routing import RoutingRecorder, RoutingShape, replay_routing_shape
from tests.test_batching import ROW_A, ROW_B, ROW_C, columns_of, rows_of_lengths, with_routing
from tests.test_torch_backend import config, response_tokens, rollout_batch
from training.batch import pack_by_token_budget, pack_micro_batch, pad_micro_batch, rows_of
from training.torch_backend import TorchBackend
from training.varlen_attention import transformers_attention

CPU = torch.device("cpu")

# --- the packed layout ----------------------------------------------------------------------------


def test_pack_micro_batch_by_hand():
    rows = rows_of([build_rollout_batch(columns_of([ROW_A, ROW_B, ROW_C]))])
    mb = pack_micro_batch(rows, [0, 1, 2])
    # A: 5 6 7 | 8 9, B: 5 | 3 4 2, C: 4 4 | 1. Each row feeds all its tokens but the last.
    assert mb.input_ids.tolist() == [[5, 6, 7, 8, 5, 3, 4, 4, 4]]
    assert mb.targets.tolist() == [[6, 7, 8, 9, 3, 4, 2, 4, 1]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert mb.cu_seqlens.tolist() == [0, 4, 7, 9] and mb.cu_seqlens.dtype == torch.int32
    assert mb.max_seqlen == 4
    padded = pad_micro_batch(rows, [0, 1, 2])
    for name in ("loss_mask", "rollout_log_probs", "advantages"):
        assert torch.equal(getattr(mb, name), getattr(padded, name)), name
    # unpack puts each packed position where the padded layout scores the same target (0 on
    # padding, as the padded targets hold there)
    assert torch.equal(mb.unpack(mb.targets.float()), padded.targets.float())
    assert padded.unpack(padded.targets) is padded.targets


def test_packed_routing_is_the_rows_own_back_to_back():
    shape = RoutingShape(layers=3, top_k=2, num_experts=8)
    routed = [with_routing(row, shape, seed) for seed, row in enumerate([ROW_A, ROW_B, ROW_C])]
    rows = rows_of([build_rollout_batch(columns_of(routed))], shape)
    mb = pack_micro_batch(rows, [0, 1, 2])
    expected = np.concatenate([row["routed_experts"] for row in routed])
    assert mb.routed_experts.shape == (1, 9, 3, 2)  # one routed position per fed token
    np.testing.assert_array_equal(mb.routed_experts[0].numpy(), expected)


def test_pack_by_token_budget_by_hand():
    # longest first, each into the first micro-batch with room: 7+5, then 6+3+2
    assert pack_by_token_budget(rows_of_lengths([6, 5, 7, 2, 3]), 12) == [[1, 2], [0, 3, 4]]
    assert pack_by_token_budget(rows_of_lengths([3, 50, 3]), 10) == [[1], [0, 2]]
    assert pack_by_token_budget(rows_of_lengths([]), 10) == []


@pytest.mark.parametrize("budget", [8, 20, 64, 1000])
def test_pack_by_token_budget_respects_the_budget_and_takes_every_row_once(budget):
    lengths = [random.Random(budget).randint(2, 40) for _ in range(60)]
    groups = pack_by_token_budget(rows_of_lengths(lengths), budget)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        assert group == sorted(group)
        assert sum(lengths[i] for i in group) <= budget or len(group) == 1


# --- the torch backend: packed against padded -----------------------------------------------------


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def step(pack: bool, batches, **overrides) -> tuple[list[torch.Tensor], object, dict]:
    """A fresh trainer's log-probs of the rows, then one step: its stats and gradients."""
    cfg = config(**{"train.pack_sequences": str(pack).lower()}, **overrides)
    backend = TorchBackend(cfg, CPU)
    log_probs = backend.compute_log_probs(batches)
    stats = backend.train(batches, response_tokens(batches))
    grads = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}
    return log_probs, stats, grads


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # token mean; a 40-token budget: several micro-batches either way
        # per-sequence terms (sequence mean, GSPO's sequence ratio) and the KL reference's pass
        {
            "algorithm.loss_aggregation": "sequence_mean",
            "algorithm.loss": "gspo",
            "algorithm.kl_coef": "0.1",
            "train.max_tokens_per_micro_batch": "1000",
        },
    ],
    ids=["token-mean", "sequence-terms-and-kl"],
)
def test_packed_log_probs_loss_and_gradients_equal_the_padded_ones(overrides):
    """fp32 on the CPU: within 1e-6 relative. A packed row attending across its sequences, or
    positions not restarting at 0, would change the log-probs of every row after the first
    in a micro-batch by far more."""
    overrides = {"train.max_tokens_per_micro_batch": "40"} | overrides
    batches = [rollout_batch(4, 16), rollout_batch(7, 5)]
    padded_lp, padded, padded_grads = step(False, batches, **overrides)
    packed_lp, packed, packed_grads = step(True, batches, **overrides)
    assert [len(lp) for lp in packed_lp] == [len(lp) for lp in padded_lp]
    for a, b in zip(packed_lp, padded_lp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert packed.loss == pytest.approx(padded.loss, rel=1e-6)
    assert packed.kl_loss == pytest.approx(padded.kl_loss, rel=1e-6, abs=1e-9)
    assert packed.grad_norm == pytest.approx(padded.grad_norm, rel=1e-6)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        assert relative_error(packed_grads[name], grad) < 1e-6, name


def test_the_packed_forward_feeds_real_tokens_only():
    """The model sees each row's tokens once, none of padding: 21 rows, one micro-batch."""
    batches = [rollout_batch(4, 16), rollout_batch(7, 5)]
    rows = rows_of(batches)
    backend = TorchBackend(config(**{"train.pack_sequences": "true"}), CPU)
    with RoutingRecorder(backend.model) as recorder:
        backend.compute_log_probs(batches)
    (call,) = recorder.calls
    assert call[0].shape[0] == sum(rows.length(i) - 1 for i in range(len(rows)))


# --- routing replay without padding ---------------------------------------------------------------


def routed_batch(seed: int, rows: int, shape: RoutingShape):
    """`rollout_batch` rows with random routing: top_k distinct experts per position."""
    batch = rollout_batch(seed, rows).to_pydict()
    rng = np.random.default_rng(seed)
    batch["routed_experts"] = []
    for prompt, response in zip(batch["prompt_ids"], batch["response_ids"], strict=True):
        scores = rng.random((len(prompt) + len(response) - 1, shape.layers, shape.num_experts))
        experts = np.argsort(scores, axis=-1)[..., : shape.top_k]
        batch["routed_experts"].append(experts.astype(shape.dtype).ravel())
    return build_rollout_batch(batch)


def test_routing_replay_with_packing_replays_only_the_rows_own_routing():
    """Every replayed position is a real token's, with the experts its engine recorded: per
    micro-batch and MoE layer, the ids the routers took are the rows' routing back to back.
    The padded path replays its padding and each row's last token too (experts 0..k-1)."""
    cfg = config(**{"algorithm.routing_replay": "true", "train.max_tokens_per_micro_batch": "40"})
    shape = replay_routing_shape(cfg)
    batches = [routed_batch(4, 16, shape)]
    rows = rows_of(batches, shape)
    replayed = {}
    log_probs = {}
    for pack in (False, True):
        cfg.train.pack_sequences = pack
        backend = TorchBackend(cfg, CPU)
        with RoutingRecorder(backend.model) as recorder:
            log_probs[pack] = backend.compute_log_probs(batches)
        replayed[pack] = recorder.calls
    plan = pack_by_token_budget(rows, 40)
    assert len(replayed[True]) == len(plan) > 1
    for call, indices in zip(replayed[True], plan, strict=True):
        for layer, ids in enumerate(call):
            expected = np.concatenate([rows.routed_experts[i][:, layer] for i in indices])
            np.testing.assert_array_equal(ids.numpy(), expected)
    real = sum(rows.length(i) - 1 for i in range(len(rows)))
    assert sum(call[0].shape[0] for call in replayed[True]) == real
    assert sum(call[0].shape[0] for call in replayed[False]) > real
    for a, b in zip(log_probs[True], log_probs[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("option", ["sliding_window", "softcap", "s_aux"])
def test_attention_options_packing_lacks_are_refused_not_dropped(option):
    """A model asking for sliding windows, soft-capping or sinks would get plain causal
    attention from the packed path: it is refused, naming the setting."""
    query = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"train\.pack_sequences"):
        transformers_attention(None, query, query, query, None, **{option: 1})
