"""The 8-GPU topology run's pieces (bench/run_gpu_topology.sh), checked without GPUs: its model
keeps Qwen3-30B-A3B's widths, its layouts pass the Megatron start-up checks on 8 and 4 GPUs,
the dry run places it on one node of 8, and the step table reads a run's metrics."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.summarize_run import COLUMNS, table
from bench.topology import topology_config
from config.errors import UserError
from config.schema import ParallelConfig, TrainConfig
from models.reference import qwen3_30b_a3b_config
from training.megatron.model_config import model_shape
from training.megatron.parallel import check_megatron_config

ROOT = Path(__file__).resolve().parent.parent


def test_topology_model_has_the_widths_of_qwen3_30b_a3b():
    small, full = model_shape(topology_config(8)), model_shape(qwen3_30b_a3b_config())
    cut = {"num_layers", "vocab_size", "moe_layer_freq"}
    for field in dataclasses.fields(full):
        if field.name not in cut:
            assert getattr(small, field.name) == getattr(full, field.name), field.name
    assert small.num_layers == 8
    assert small.vocab_size % 128 == 0


def _cpu_adam(world: int, **parallel) -> TrainConfig:
    train = TrainConfig(backend="megatron", num_workers=world, parallel=ParallelConfig(**parallel))
    train.optimizer_cpu_offload = train.overlap_cpu_optimizer_d2h_h2d = True
    train.use_precision_aware_optimizer = True
    return train


@pytest.mark.parametrize(
    ("world", "parallel"),
    [(8, dict(tensor=4, sequence=True, expert=8)), (4, dict(tensor=2, sequence=True, expert=4))],
)
def test_the_runs_layouts_pass_the_start_up_checks(world, parallel):
    check_megatron_config(_cpu_adam(world, **parallel), "bfloat16", model_shape(topology_config()))


def test_a_layout_that_does_not_divide_is_refused_with_the_numbers():
    message = r"128 experts are not divisible by train\.parallel\.expert=3"
    with pytest.raises(UserError, match=message):
        check_megatron_config(_cpu_adam(6, expert=3), "bfloat16", model_shape(topology_config()))


@pytest.mark.cluster
def test_dry_run_puts_the_tensor_parallel_groups_inside_the_node(tmp_path):
    """The run's own flags, planned for one node of 8 GPUs (config.json only: no weights)."""
    topology_config(8).save_pretrained(tmp_path / "model")
    flags = ["--model.hf_checkpoint", str(tmp_path / "model"), "--model.dtype", "bfloat16"]
    flags += ["--train.backend", "megatron", "--train.num_workers", "8"]
    flags += ["--tensor-model-parallel-size", "4", "--sequence-parallel"]
    flags += ["--expert-model-parallel-size", "8", "--optimizer-cpu-offload"]
    flags += ["--overlap-cpu-optimizer-d2h-h2d", "--use-precision-aware-optimizer"]
    flags += ["--rollout.num_engines", "8", "--placement.colocate", "true"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "driver.py"), *flags, "--dry-run", "--cluster", "1x8"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    rows = re.findall(r"^(train|engine) (\d+)\s+(\d+)\s.*\s(\d+)\s+(\d+)$", done.stdout, re.M)
    placed = {(role, int(i)): (int(node), int(gpu)) for role, i, node, _, gpu in rows}
    # Every rank and every engine on node 0, rank r and engine r sharing GPU r (colocated).
    assert placed == {(role, i): (0, i) for role in ("train", "engine") for i in range(8)}
    assert "optimizer_cpu_offload: true" in done.stdout  # one node: CPU Adam stays on


def test_step_table_has_a_row_per_training_step():
    lines = [
        {"step": 0, "eval/accuracy": 0.1},
        *({"step": s, **{key: float(s) for key in COLUMNS.values()}} for s in (1, 2)),
    ]
    rows = table(lines).splitlines()
    assert len(rows) == 2 + 2  # header, rule, two steps; the evaluation is left out
    assert rows[3].startswith("| 2 | 2 | 2 |")
    assert json.dumps(lines)  # plain JSON lines, as metrics.jsonl holds
