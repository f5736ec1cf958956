"""The Megatron backend on the CPU (gloo, megatron-core under the test-only shim).

Two torchrun worlds (1 and 2 processes) run `tests/megatron/layouts.py`, which trains the
built-in model under several parallel layouts on the same rows; the tests compare what they
recorded. Start-up checks and the model-argument derivation are tested directly (no
megatron-core import).
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from config.errors import UserError
from config.schema import ParallelConfig, SluiceConfig, TrainConfig
from models.reference import qwen3_30b_a3b_config
from models.tiny import tiny_config
from training.megatron.model_config import model_args, model_shape
from training.megatron.parallel import check_megatron_config
from training.megatron.routing_replay import check_replayable

ROOT = Path(__file__).resolve().parent.parent
SHIM_SITE = ROOT / "tests" / "megatron" / "site"
TWO_RANK_LAYOUTS = ["dp2", "tp2-sp", "ep2", "pp2", "tp2-sp-etp2", "dp2-bf16", "dp2-bf16-cpuadam"]
OVERLAP_LAYOUTS = ["ep2-bf16-cpuadam", "ep2-bf16-cpuadam-overlap"]
"""CPU Adam without and with its host step overlapped with the next forward: experts stepped
whole (expert data-parallel size 1), the rest sharded over two ranks and all-gathered."""
LOCAL_SPEC_LAYOUTS = ["tp1", "tp2-sp", "ep2"]
"""Also run with megatron-core's local layer spec (`-local`), to compare with ours."""
ROUTING_REPLAY_LAYOUTS = ["tp2-sp-r3", "ep2-r3", "pp2-r3"]
"""Also run with routing replay (`-r3`): the sequence-parallel slice, the expert-parallel
dispatch and the pipeline stage's own layers."""
PACKED_LAYOUT = "tp2-sp-ep2-r3"
"""Run padded and packed (`-pack`): THD through tensor, sequence and expert parallelism with
routing replay."""

ONE_RANK_EXTRAS = ["tp1-full", "tp1-selective", "tp1-r3-full", "tp1-mb2", "tp1-ent"]
"""Activation recompute (`-full`, `-selective`), with R3 too, mini-batches (`-mb2`), and the
entropy bonus (`-ent`)."""
ENTROPY_LAYOUT = "tp2-sp-ent"
"""The entropy bonus with its gradient split over the vocabulary of two ranks."""


def run_layouts(out: Path, nproc: int, layouts: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{SHIM_SITE}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    command += ["--standalone", str(ROOT / "tests/megatron/layouts.py"), str(out), *layouts]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("layouts")
    results = run_layouts(out / "one.json", 1, ["tp1", "tp1-local", "tp1-r3", *ONE_RANK_EXTRAS])
    two = TWO_RANK_LAYOUTS + [f"{name}-local" for name in LOCAL_SPEC_LAYOUTS[1:]]
    two += [*ROUTING_REPLAY_LAYOUTS, PACKED_LAYOUT, f"{PACKED_LAYOUT}-pack", ENTROPY_LAYOUT]
    two += OVERLAP_LAYOUTS
    results |= run_layouts(out / "two.json", 2, two)
    return results, out


def _weights(out: Path, layout: str) -> dict[str, torch.Tensor]:
    name = "one.json" if layout.startswith("tp1") else "two.json"
    return torch.load(out / f"{name}.{layout}.pt")


@pytest.mark.megatron
@pytest.mark.parametrize("layout", ["tp1", "tp2-sp", "ep2", "pp2", "tp2-sp-etp2"])
def test_log_probs_equal_the_hugging_face_model(layouts, layout):
    results, _ = layouts
    assert results[layout]["logprob_abs_diff_mean"] < 1e-4


@pytest.mark.megatron
@pytest.mark.parametrize("layout", ["tp1", "dp2", "tp2-sp", "ep2", "pp2", "tp2-sp-etp2"])
def test_exported_weights_equal_the_hugging_face_state_dict_bit_for_bit(layouts, layout):
    results, _ = layouts
    assert results[layout]["exported_equals_hf_at_start"] is True


@pytest.mark.megatron
@pytest.mark.parametrize("layout", LOCAL_SPEC_LAYOUTS)
def test_torch_spec_trains_like_megatron_cores_local_spec(layouts, layout):
    """Grouped experts + SDPA against SequentialMLP + unfused attention, same init, fp32:
    losses, gradient norms and the exported weights after three steps, within 1e-5."""
    results, out = layouts
    ours, local = results[layout], results[f"{layout}-local"]
    assert len(set(ours["losses"])) == len(ours["losses"]), "training must change the loss"
    assert ours["losses"] == pytest.approx(local["losses"], rel=1e-5, abs=1e-7)
    assert ours["grad_norms"] == pytest.approx(local["grad_norms"], rel=1e-5)
    assert local["exported_equals_hf_at_start"] is True
    trained, reference = _weights(out, layout), _weights(out, f"{layout}-local")
    assert trained.keys() == reference.keys()
    for name in reference:  # Adam amplifies rounding: see test_parallel_layouts_train_like_tp1
        torch.testing.assert_close(trained[name], reference[name], rtol=1e-5, atol=1e-5)


@pytest.mark.megatron
@pytest.mark.parametrize("layout", ["dp2", "tp2-sp", "ep2", "pp2", "tp2-sp-etp2"])
def test_parallel_layouts_train_like_tp1(layouts, layout):
    results, out = layouts
    expected = results["tp1"]["losses"]
    assert len(set(expected)) == len(expected), "training must change the loss step to step"
    assert results[layout]["losses"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    reference, trained = _weights(out, "tp1"), _weights(out, layout)
    assert reference.keys() == trained.keys()
    # One step moves a weight by up to lr = 1e-2. Reduction-order rounding of a gradient
    # element (~1e-9) reaches the weights through Adam as about lr * 1e-9 / adam_eps per step:
    # ~1e-7 with layouts.py's eps 1e-4 (1e-5 was seen with the default 1e-8).
    for name in reference:
        torch.testing.assert_close(trained[name], reference[name], rtol=1e-5, atol=1e-5)


@pytest.mark.megatron
@pytest.mark.parametrize("layout", ["tp1-r3", *ROUTING_REPLAY_LAYOUTS])
def test_routing_replay_forces_the_rows_experts(layouts, layout):
    """Under routing replay, Megatron's log-probs are the Hugging Face model's with the rows'
    (random) routing forced, not with its own; and the parallel layouts train like TP1."""
    results, _ = layouts
    assert results[layout]["logprob_abs_diff_mean"] < 1e-4
    assert results[layout]["free_logprob_abs_diff_mean"] > 1e-3  # the forcing changed them
    expected = results["tp1-r3"]["losses"]
    assert expected != pytest.approx(results["tp1"]["losses"], rel=1e-4)
    assert results[layout]["losses"] == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.megatron
def test_packed_rows_train_like_padded_ones(layouts):
    """fp32, TP2 + SP + EP2 + R3: the log-probs and the first step's loss and gradient norm
    within 1e-6 of the padded micro-batches'; the later steps (after Adam moved the weights
    by a rounding apart) within 1e-5."""
    results, _ = layouts
    padded, packed = results[PACKED_LAYOUT], results[f"{PACKED_LAYOUT}-pack"]
    assert packed["logprob_abs_diff_mean"] < 1e-4  # the rows' routing forced, as padded
    for a, b in zip(packed["log_probs"], padded["log_probs"], strict=True):
        assert a == pytest.approx(b, rel=1e-6)
    for key in ("losses", "grad_norms"):
        assert packed[key][0] == pytest.approx(padded[key][0], rel=1e-6)
        assert packed[key] == pytest.approx(padded[key], rel=1e-5)


@pytest.mark.megatron
def test_recompute_trains_bit_for_bit_and_mini_batches_take_their_steps(layouts):
    """fp32: activation recompute gives the same losses, gradient norms and weights as none
    (with R3 too: megatron-core's replay keeps the micro-batch's experts for the recomputed
    forward), while the recomputed modules really run twice; two mini-batches over two
    epochs take four optimizer steps per rollout step and the clip acts (ratio against the
    log-probs before the first)."""
    results, out = layouts
    for layout, base in (("tp1-full", "tp1"), ("tp1-selective", "tp1"), ("tp1-r3-full", "tp1-r3")):
        assert results[layout]["losses"] == results[base]["losses"]
        assert results[layout]["grad_norms"] == results[base]["grad_norms"]
        trained, reference = _weights(out, layout), _weights(out, base)
        assert all(torch.equal(trained[name], w) for name, w in reference.items()), layout
    plain = results["tp1"]["forwards"]
    assert results["tp1-full"]["forwards"] == {key: 2 * n for key, n in plain.items()}
    selective = {"layer": plain["layer"], "core_attention": 2 * plain["core_attention"]}
    assert results["tp1-selective"]["forwards"] == selective
    split = results["tp1-mb2"]
    assert results["tp1"]["optimizer_steps"] == [1, 1, 1] and split["optimizer_steps"] == [4] * 3
    assert min(split["clip_fractions"]) > 0
    assert split["losses"] != pytest.approx(results["tp1"]["losses"], rel=1e-3)


@pytest.mark.megatron
def test_cpu_adam_matches_the_device_optimizer(layouts):
    """--optimizer-cpu-offload --overlap-cpu-optimizer-d2h-h2d --use-precision-aware-optimizer
    gives the parameters of a run without offload (bf16 parameters, fp32 optimizer state)."""
    results, out = layouts
    plain, offloaded = _weights(out, "dp2-bf16"), _weights(out, "dp2-bf16-cpuadam")
    start = {n: t.to(torch.bfloat16) for n, t in _weights(out, "tp1").items()}
    assert any(not torch.equal(plain[n], start[n]) for n in plain), "weights must have moved"
    # Both step fp32 master weights with Adam, through different kernels (the CPU optimizer,
    # megatron-core's device one): one fp32 rounding apart can round to neighbouring bf16
    # values. So: almost every element bit-equal, none more than one bf16 step apart.
    equal = total = 0
    for name in plain:
        a, b = offloaded[name].float(), plain[name].float()
        torch.testing.assert_close(a, b, rtol=2**-7, atol=0, msg=name)
        equal, total = equal + int((a == b).sum()), total + a.numel()
    assert equal >= 0.999 * total, f"only {equal} of {total} elements bit-equal"
    expected = results["dp2-bf16"]["losses"]
    assert results["dp2-bf16-cpuadam"]["losses"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.megatron
def test_cpu_adam_overlapped_with_the_next_forward_is_the_same_update(layouts):
    """train.overlap_cpu_adam_with_forward: the next step's first layer runs before the host
    step of the last layer's parameters is done (its gate, a named point, is opened by that
    forward), and every loss, gradient norm and weight equals CPU Adam's without overlap."""
    results, out = layouts
    serial, overlapped = results["ep2-bf16-cpuadam"], results["ep2-bf16-cpuadam-overlap"]
    assert overlapped["host_steps_opened_by_forward"] == [True, True]
    assert overlapped["losses"] == serial["losses"]
    assert overlapped["grad_norms"] == serial["grad_norms"]
    before, after = _weights(out, "ep2-bf16-cpuadam"), _weights(out, "ep2-bf16-cpuadam-overlap")
    start = {n: t.to(torch.bfloat16) for n, t in _weights(out, "tp1").items()}
    assert any(not torch.equal(before[n], start[n]) for n in before), "weights must have moved"
    assert all(torch.equal(after[name], w) for name, w in before.items())


# Start-up checks: each names the numbers.


def _train(world: int, **parallel) -> TrainConfig:
    return TrainConfig(backend="megatron", num_workers=world, parallel=ParallelConfig(**parallel))


@pytest.mark.parametrize(
    ("world", "parallel", "message"),
    [
        (4, dict(tensor=8), "4 is not divisible by tensor x pipeline x context"),
        (3, dict(tensor=3, sequence=True), "4 attention heads are not divisible by"),
        (6, dict(expert=3), "8 experts are not divisible by train.parallel.expert=3"),
        (2, dict(tensor=2), "needs train.parallel.sequence=true"),
        (2, dict(context=2), "context parallelism needs Transformer Engine"),
        (1, dict(sequence=True), "sequence=true needs train.parallel.tensor > 1"),
        (4, dict(pipeline=3), "not divisible by tensor x pipeline x context"),
    ],
)
def test_invalid_layouts_fail_at_start_up_with_the_numbers(world, parallel, message):
    with pytest.raises(UserError, match=message):
        check_megatron_config(_train(world, **parallel), "float32", model_shape(tiny_config()))


def test_cpu_adam_in_fp32_with_the_distributed_optimizer_is_refused():
    train = _train(2)
    train.optimizer_cpu_offload = True
    with pytest.raises(UserError, match="train in bfloat16"):
        check_megatron_config(train, "float32", model_shape(tiny_config()))
    check_megatron_config(train, "bfloat16", model_shape(tiny_config()))


def test_cpu_adam_overlap_without_its_cpu_adam_settings_is_refused_by_name():
    train = _train(2)
    train.optimizer_cpu_offload = train.overlap_cpu_adam_with_forward = True
    missing = "train.overlap_cpu_optimizer_d2h_h2d=true, train.use_precision_aware_optimizer=true"
    with pytest.raises(UserError, match=f"overlap_cpu_adam_with_forward needs {missing}"):
        check_megatron_config(train, "bfloat16", model_shape(tiny_config()))
    train.overlap_cpu_optimizer_d2h_h2d = train.use_precision_aware_optimizer = True
    check_megatron_config(train, "bfloat16", model_shape(tiny_config()))


def test_packing_with_megatron_cores_local_attention_is_refused():
    train = _train(2)
    train.pack_sequences, train.layer_spec = True, "local"
    with pytest.raises(UserError, match=r"pack_sequences=true needs train\.layer_spec=torch"):
        check_megatron_config(train, "float32", model_shape(tiny_config()))
    train.layer_spec = "torch"
    check_megatron_config(train, "float32", model_shape(tiny_config()))


def megatron_settings(fusion: bool, recompute: str | None, pipeline: int) -> SimpleNamespace:
    """The three fields of megatron-core's `TransformerConfig` that `check_replayable` reads
    (a real one reaches it in every `-r3` layout above, where the model is built)."""
    return SimpleNamespace(
        moe_router_fusion=fusion,
        recompute_granularity=recompute,
        pipeline_model_parallel_size=pipeline,
    )


@pytest.mark.parametrize(
    ("fusion", "recompute", "pipeline", "refused"),
    [
        (True, None, 1, ["moe_router_fusion=True"]),
        (False, "full", 2, ["recompute_granularity='full' with train.parallel.pipeline=2"]),
        (False, "selective", 4, ["recompute_granularity='selective'"]),
        (True, "full", 2, ["moe_router_fusion=True", "recompute_granularity='full'"]),
        (False, "full", 1, []),  # each micro-batch's backward follows its own forward
        (False, None, 2, []),  # what Sluice builds: PP replays, tested in the pp2-r3 layout
    ],
)
def test_routing_replay_refuses_what_megatron_core_would_not_replay(
    fusion, recompute, pipeline, refused
):
    settings = megatron_settings(fusion, recompute, pipeline)
    if not refused:
        check_replayable(settings)
        return
    with pytest.raises(UserError) as error:
        check_replayable(settings)
    message = str(error.value)
    assert message.startswith("algorithm.routing_replay=true (R3) cannot be replayed")
    assert all(part in message for part in refused), message
    assert ("moe_router_fusion" in message) == fusion


# scripts/models/qwen3-30B-A3B.sh of the seed (slime), MODEL_ARGS, with the layer pattern
# written out.
SEED_MODEL_ARGS = (
    "--disable-bias-linear --qk-layernorm --group-query-attention --num-attention-heads 32 "
    "--num-query-groups 4 --kv-channels 128 --num-layers 48 --hidden-size 2048 "
    "--ffn-hidden-size 6144 --normalization RMSNorm --position-embedding-type rope "
    "--norm-epsilon 1e-6 --rotary-percent 1.0 --swiglu --untie-embeddings-and-output-weights "
    "--vocab-size 151936 --rotary-base 1000000 --moe-ffn-hidden-size 768 "
    "--moe-router-score-function softmax --moe-token-dispatcher-type alltoall "
    "--moe-router-topk 8 --moe-layer-freq [" + ",".join(["1"] * 48) + "] --num-experts 128 "
    "--moe-grouped-gemm --moe-token-drop-policy probs --moe-router-dtype fp32 "
    "--moe-permute-fusion --moe-aux-loss-coeff 0"
)


def test_the_seed_model_args_fall_out_of_the_hugging_face_config():
    assert " ".join(model_args(qwen3_30b_a3b_config())) == SEED_MODEL_ARGS


def test_the_reference_layout_is_valid_for_qwen3_30b_a3b():
    """The seed's PERF_ARGS on 8 GPUs: TP4 + SP, EP8, ETP1, with CPU Adam in bf16."""
    train = _train(8, tensor=4, sequence=True, expert=8, expert_tensor=1)
    train.optimizer_cpu_offload = True
    train.overlap_cpu_optimizer_d2h_h2d = True
    train.use_precision_aware_optimizer = True
    check_megatron_config(train, "bfloat16", model_shape(qwen3_30b_a3b_config()))


def test_save_interval_needs_a_save_directory():
    config = SluiceConfig()
    config.checkpoint.save_interval = 5
    with pytest.raises(UserError, match=r"needs checkpoint.save \(--save DIR\)"):
        config.validate()


@pytest.mark.megatron
def test_the_entropy_bonus_enters_the_loss_and_trains_alike_under_tensor_parallelism(layouts):
    """train/entropy is reported without the bonus too; with algorithm.entropy_coef 0.1 the
    loss is the policy loss minus 0.1 x the entropy, and TP2 + SP (the entropy's gradient
    vocabulary-parallel) trains like TP1."""
    results, out = layouts
    plain, bonus, split = results["tp1"], results["tp1-ent"], results[ENTROPY_LAYOUT]
    assert plain["entropies"][0] == pytest.approx(bonus["entropies"][0], rel=1e-6)  # same start
    assert all(e > 0.1 for e in plain["entropies"])
    for loss, policy, entropy in zip(
        bonus["losses"], bonus["policy_losses"], bonus["entropies"], strict=True
    ):
        assert loss == pytest.approx(policy - 0.1 * entropy, rel=1e-6, abs=1e-8)
    assert bonus["entropies"][-1] != pytest.approx(plain["entropies"][-1], rel=1e-4)
    assert split["losses"] == pytest.approx(bonus["losses"], rel=1e-5, abs=1e-7)
    assert split["entropies"] == pytest.approx(bonus["entropies"], rel=1e-5)
    reference, trained = _weights(out, "tp1-ent"), _weights(out, ENTROPY_LAYOUT)
    for name in reference:  # Adam amplifies rounding: see test_parallel_layouts_train_like_tp1
        torch.testing.assert_close(trained[name], reference[name], rtol=1e-5, atol=1e-5)
