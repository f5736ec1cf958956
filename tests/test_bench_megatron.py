"""bench/bench_megatron.py: its length profile, layout parts and FLOP count directly, and one
CPU smoke run (`--tiny`, gloo, megatron-core under the test-only shim) of issue 30's paths:
long-tailed rows padded and packed, activation recompute, the log-prob memory measurement."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import bench_megatron as bench
from bench.topology import topology_config

ROOT = Path(__file__).resolve().parent.parent
SHIM_SITE = ROOT / "tests" / "megatron" / "site"


def test_the_long_tail_profile_is_seeded_and_has_the_asked_mean_and_maximum():
    lengths = bench.long_tail_lengths(256, 2048, 8192, 64)
    assert lengths == bench.long_tail_lengths(256, 2048, 8192, 64)
    summary = bench.length_summary(lengths)
    assert summary["rows"] == 256 and abs(summary["mean"] - 2048) < 2
    assert summary["max"] == 8192 and summary["min"] >= 64
    assert summary["p50"] < 0.8 * summary["mean"]  # long-tailed: most rows are short


def test_layout_parts_set_packing_and_recompute():
    full = bench.parse_layout("tp1-ep1-pack-rcfull", 1)
    assert full.pack and full.recompute == ("full", "uniform", 1)
    assert bench.parse_layout("dp1-rcfull2", 1).recompute == ("full", "uniform", 2)
    assert bench.parse_layout("dp1-rcblock1", 1).recompute == ("full", "block", 1)
    selective = bench.parse_layout("dp1-rcsel", 1)
    assert not selective.pack and selective.recompute[0] == "selective"
    sizes = bench.Sizes(False, 1, 8, (8,), "fixed", 64, 0, 1, 1, 1, 512, Path("/x"))
    train = bench.sluice_config(full, 1, sizes, on_gpu=False).train
    assert train.pack_sequences and train.recompute_granularity == "full"
    with pytest.raises(ValueError, match="unknown part 'rcblock'"):
        bench.parse_layout("dp1-rcblock", 1)


def test_a_steps_flops_count_each_rows_attention_at_its_own_length():
    config = topology_config(2)
    facts = bench.model_facts(config, bench.checkpoint_shapes(config))
    assert facts.attention_flops == 12 * 2 * 32 * 128
    lengths = (100, 8000)
    expected = sum(n * facts.flops_per_token(n) for n in lengths)
    assert facts.step_flops(lengths) == pytest.approx(expected, rel=1e-12)
    assert facts.step_flops(lengths) < sum(lengths) * facts.flops_per_token(8000)


def test_computed_tokens_count_padding_and_packing_per_data_parallel_rank():
    from types import SimpleNamespace

    lengths = (10, 40, 12, 30)
    sizes = SimpleNamespace(rows=4, lengths=lengths)
    batches = bench.rollout_batches(sizes, 64)  # one row a batch
    train = SimpleNamespace(pack_sequences=False)
    backend = SimpleNamespace(config=SimpleNamespace(train=train), data_parallel_size=2)
    # rank 0: rows 10 and 12, rank 1: 40 and 30; a budget of 80 tokens puts each pair together
    assert bench.computed_tokens(backend, batches, 80) == 2 * 12 + 2 * 40
    train.pack_sequences = True
    assert bench.computed_tokens(backend, batches, 80) == sum(lengths) - 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mean-len", "100"], "--mean-len: only with --lengths longtail"),
        (["--lengths", "longtail", "--seq", "64"], "--seq: only with --lengths fixed"),
        (["--lengths", "longtail", "--mean-len", "9000"], "need 4 <= min < mean < max"),
    ],
)
def test_length_options_that_would_be_ignored_or_cannot_hold_are_refused(
    monkeypatch, capsys, argv, message
):
    monkeypatch.setattr(sys, "argv", ["bench_megatron.py", "--out", "/tmp/x", *argv])
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.bench
@pytest.mark.megatron
def test_the_tiny_bench_runs_long_tailed_rows_padded_packed_and_recomputed(tmp_path):
    layouts = ["dp1", "dp1-pack", "dp1-pack-rcfull", "dp1-rcsel"]
    env = dict(os.environ, PYTHONPATH=f"{SHIM_SITE}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=1", str(ROOT / "bench/bench_megatron.py"), "--tiny"]
    command += ["--lengths", "longtail", "--layouts", ",".join(layouts), "--logprob-memory"]
    command += ["--warmup", "0", "--steps", "2", "--export-repeats", "1"]
    command += ["--out", str(tmp_path), "--model-dir", str(tmp_path / "model")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "megatron_bench.json").read_text())
    assert report["batch"]["lengths"] == "longtail"
    lengths = bench.long_tail_lengths(16, 32, 128, 4)
    assert report["batch"]["length_summary"] == pytest.approx(bench.length_summary(lengths))
    results = report["layouts"]
    assert not [name for name, r in results.items() if "error" in r]
    real = sum(lengths)
    padded, packed = results["dp1"], results["dp1-pack"]
    assert padded["tokens_per_step"] == packed["tokens_per_step"] == real
    assert padded["computed_tokens_per_step"] > real > packed["computed_tokens_per_step"]
    # the same rows, padded or packed, with or without recompute, train alike (fp32)
    for name in layouts[1:]:
        assert results[name]["losses"] == pytest.approx(padded["losses"], rel=1e-6)
    assert len(set(padded["losses"])) == 2, "training must change the loss"
    # MFU counts the real tokens' FLOPs, each row at its own length
    model = report["model"]
    attention = model["attention_flops_per_token_per_position"] * float(np.square(lengths).sum())
    step_flops = padded["model_tflops_per_gpu"] * 1e12 * padded["step_s"]
    assert step_flops == pytest.approx(real * 6 * model["active_params"] + attention, rel=1e-9)
    # one row of the longest length: chunks of 16 tokens against one chunk of all (0)
    memory = report["log_prob_memory"]
    assert (memory["tokens"], memory["vocab"]) == (128, 256)
    assert memory["chunk_0"]["max_abs_diff"] < 1e-6
    assert memory["chunk_16"]["seconds"] > 0
