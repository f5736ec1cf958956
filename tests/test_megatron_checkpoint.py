"""Megatron checkpoints: HF <-> torch_dist conversion, resuming an optimizer, atomic commits.

The converters run as the user runs them (torchrun, or a plain process) with megatron-core
under the test-only CPU shim. Every such process pays megatron-core's import (~15 s), so one
conversion (HF -> torch_dist at TP2 x EP2 over two ranks, back to HF at TP1 in one) is shared
by the tests through module-scoped fixtures; the refusals run before megatron-core is
imported and take seconds. The commit / latest logic and the safetensors I/O are plain
Python and are tested directly.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from config.errors import UserError
from models.checkpoint_format import checkpoint_tensors
from models.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsReader, write_sharded
from models.tiny import build_tiny_model, build_tokenizer, save_tiny_model
from training.megatron.checkpoint import (
    TRACKER_FILE,
    checkpoint_dir,
    commit,
    has_optimizer_state,
    is_torch_dist_checkpoint,
    latest,
    staging_dir,
)

pytestmark = pytest.mark.megatron

ROOT = Path(__file__).resolve().parent.parent
SHIM_SITE = ROOT / "tests" / "megatron" / "site"
TO_TORCH_DIST = ROOT / "tools" / "convert_hf_to_torch_dist.py"
TO_HF = ROOT / "tools" / "convert_torch_dist_to_hf.py"
SEED = 11
# The seed script's MODEL_ARGS for this model, quoting of --moe-layer-freq included.
SEED_MODEL_ARGS = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--num-query-groups", "2", "--kv-channels", "16", "--norm-epsilon", "1e-6",
    "--rotary-base", "10000", "--untie-embeddings-and-output-weights", "--num-experts", "8",
    "--moe-layer-freq", "'([1]*2)'", "--moe-grouped-gemm", "--moe-aux-loss-coeff", "0",
]  # fmt: skip


def _env() -> dict[str, str]:
    paths = [SHIM_SITE, ROOT]
    # megatron-core's torch_dist writer needs psutil, which the project does not list yet;
    # Ray vendors a copy (this is a no-op once psutil is installed in its own right).
    ray = importlib.util.find_spec("ray")
    if ray is not None:
        paths.append(Path(ray.origin).parent / "thirdparty_files")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, paths)), OMP_NUM_THREADS="1")


def _run(*command, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(c) for c in command], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def _torchrun(nproc: int, *command, check: bool = True) -> subprocess.CompletedProcess:
    # --standalone picks a free rendezvous port (two suites may run at once).
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return _run(*launcher, f"--nproc-per-node={nproc}", *command, check=check)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "tiny"
    save_tiny_model(directory, SEED)
    return directory


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory) -> Path:
    """torch_dist checkpoint written by two ranks at TP2 x EP2."""
    save = tmp_path_factory.mktemp("torch_dist") / "tiny_torch_dist"
    layout = ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"]
    _torchrun(2, TO_TORCH_DIST, "--hf-checkpoint", hf_dir, "--save", save, *layout,
              *SEED_MODEL_ARGS)  # fmt: skip
    return save


@pytest.fixture(scope="module")
def exported(converted, hf_dir, tmp_path_factory) -> Path:
    """The TP2 x EP2 checkpoint loaded by one plain process (TP1) and written back as HF."""
    save = tmp_path_factory.mktemp("hf_out") / "tiny_hf"
    _run(sys.executable, TO_HF, "--load", converted, "--hf-config", hf_dir, "--save", save)
    return save


# HF -> torch_dist -> HF.


def test_round_trip_is_bit_identical(hf_dir, exported):
    original = load_file(hf_dir / SINGLE_FILE)
    back = load_file(exported / SINGLE_FILE)
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name


def test_exported_directory_loads_with_transformers_and_gives_the_same_logits(hf_dir, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.randint(3, 14, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = []
    for directory in (hf_dir, exported):
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert torch.equal(logits[0], logits[1])
    assert AutoTokenizer.from_pretrained(exported).encode("1 2 =") == build_tokenizer().encode(
        "1 2 ="
    )
    assert {p.name for p in exported.iterdir()} >= {"config.json", "generation_config.json"}


def test_converted_checkpoint_is_complete_and_switched_in(converted):
    assert is_torch_dist_checkpoint(converted)
    assert latest(converted) == converted
    assert not has_optimizer_state(converted)
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]  # no .tmp left
    assert not any(p.suffix == ".safetensors" for p in converted.iterdir())


# Refusals, before megatron-core is imported.


def _refused(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    imported = [
        line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")
    ]
    assert imported, "run with -X importtime"
    assert not [name for name in imported if name.startswith("megatron")]
    return done.stderr


def test_fp8_checkpoint_is_refused(hf_dir, tmp_path):
    fp8 = tmp_path / "tiny-FP8"
    shutil.copytree(hf_dir, fp8)
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    (fp8 / "config.json").write_text(json.dumps(config))
    save = tmp_path / "out"
    done = _run(sys.executable, "-X", "importtime", TO_TORCH_DIST, "--hf-checkpoint", fp8,
                "--save", save, check=False)  # fmt: skip
    message = _refused(done)
    assert "error:" in message and "quant_method=fp8" in message
    assert "bf16 Hugging Face checkpoint" in message and "Qwen3-30B-A3B-FP8" in message
    assert not save.exists()


def test_model_args_that_disagree_with_the_config_are_refused(hf_dir, tmp_path):
    done = _run(sys.executable, "-X", "importtime", TO_TORCH_DIST, "--hf-checkpoint", hf_dir,
                "--save", tmp_path / "out", "--num-layers", "3", check=False)  # fmt: skip
    message = _refused(done)
    assert "--num-layers 3 is given" in message and "gives --num-layers 2" in message


@pytest.fixture(scope="module")
def converter():
    spec = importlib.util.spec_from_file_location("convert_hf_to_torch_dist", TO_TORCH_DIST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_args_check_flag_by_flag(converter, hf_dir):
    config = build_tiny_model(SEED).config
    check = converter.check_model_args
    check(SEED_MODEL_ARGS, config, "hf")  # agrees, in the seed script's spelling
    check(["--moe-layer-freq", "1", "--norm-epsilon=0.000001", "--swiglu"], config, "hf")
    with pytest.raises(UserError, match=r"unknown flag\(s\) --num-layer; .*--num-layers"):
        check(["--num-layer", "2"], config, "hf")
    with pytest.raises(UserError, match="--moe-layer-freq 2 is given"):
        check(["--moe-layer-freq", "2"], config, "hf")  # every other layer: not this model
    config.norm_topk_prob = True  # the model no longer takes the softmax before top-k
    with pytest.raises(UserError, match=r"--moe-router-pre-softmax is given, but hf/config\.json"):
        check(["--moe-router-pre-softmax"], config, "hf")
    with pytest.raises(UserError, match="follows no flag"):
        check(["2"], config, "hf")


# The optimizer state survives a save and a resume.


RESUME_VARIANTS = ["plain", "distributed", "distributed-bf16", "cpuadam-bf16"]


@pytest.fixture(scope="module")
def resume_world(tmp_path_factory) -> tuple[Path, list[str]]:
    """One two-rank world runs every resume variant and the cross-spec load (one
    megatron-core import per rank for both tests); its folder and output lines."""
    root = tmp_path_factory.mktemp("resume")
    worker = ROOT / "tests" / "megatron" / "checkpoint_resume.py"
    done = _torchrun(2, worker, root, *RESUME_VARIANTS, "cross-spec", "schedule")
    return root, done.stdout.splitlines()


def test_resumed_training_continues_bit_for_bit(resume_world):
    root, lines = resume_world
    assert [line for line in lines if line.startswith("resumed")] == [
        f"resumed {v}" for v in RESUME_VARIANTS
    ]
    for variant in RESUME_VARIANTS:
        assert (root / variant / TRACKER_FILE).read_text() == "2\n"
        assert has_optimizer_state(latest(root / variant))


def test_checkpoints_load_across_layer_specs(resume_world):
    """torch spec (stacked experts) <-> local spec (SequentialMLP), at EP2: same weights."""
    _, lines = resume_world
    loaded = [line for line in lines if line.startswith("loaded")]
    assert loaded == ["loaded torch->local", "loaded local->torch"]


def test_the_backend_resumes_its_learning_rate_schedule_exactly(resume_world):
    """MegatronBackend under a cosine schedule with warm-up: resumed after two of five steps,
    every later step has the uninterrupted run's lr, and the weights end bit-equal."""
    root, lines = resume_world
    assert "schedule resumed" in lines
    assert (root / "schedule" / TRACKER_FILE).read_text() == "2\n"


# Atomic switch-over.


def _fake_save(root: Path, step: int, complete: bool = True) -> Path:
    """What `save_torch_dist` leaves: shards, then metadata.json last (when it finished)."""
    staged = staging_dir(root, step)
    staged.mkdir(parents=True)
    (staged / "__0_0.distcp").write_text(f"weights of step {step}")
    if complete:
        (staged / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    return staged


def test_commit_switches_the_latest_checkpoint(tmp_path):
    root = tmp_path / "run"
    assert latest(root) is None
    assert staging_dir(root, 10) == root / "iter_0000010.tmp"
    _fake_save(root, 10)
    assert latest(root) is None  # staged, not committed
    assert commit(root, 10) == checkpoint_dir(root, 10) == root / "iter_0000010"
    assert latest(root) == root / "iter_0000010"
    assert (root / TRACKER_FILE).read_text() == "10\n"
    _fake_save(root, 20)
    commit(root, 20)
    assert latest(root) == root / "iter_0000020"
    assert (root / "iter_0000010").is_dir()  # older checkpoints are kept
    assert sorted(p.name for p in root.iterdir()) == [
        "iter_0000010", "iter_0000020", TRACKER_FILE,
    ]  # fmt: skip


def test_a_crashed_save_leaves_the_previous_checkpoint_latest(tmp_path):
    root = tmp_path / "run"
    _fake_save(root, 10)
    commit(root, 10)
    _fake_save(root, 20, complete=False)  # crashed while writing shards
    assert latest(root) == root / "iter_0000010"
    with pytest.raises(RuntimeError, match="not a finished checkpoint"):
        commit(root, 20)
    assert latest(root) == root / "iter_0000010"
    # Crashed while replacing the tracker: its temporary file is ignored.
    (root / (TRACKER_FILE + ".tmp")).write_text("2")
    assert latest(root) == root / "iter_0000010"


def test_committing_a_step_again_replaces_it(tmp_path):
    root = tmp_path / "run"
    _fake_save(root, 5)
    commit(root, 5)
    staged = _fake_save(root, 5)
    (staged / "__0_0.distcp").write_text("again")
    commit(root, 5)
    assert (latest(root) / "__0_0.distcp").read_text() == "again"
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000005", TRACKER_FILE]


def test_latest_reads_megatron_lm_roots_and_bare_checkpoints(tmp_path):
    release = tmp_path / "converted_by_megatron_lm"
    (release / "release").mkdir(parents=True)
    (release / "release" / "metadata.json").write_text("{}")
    (release / TRACKER_FILE).write_text("release")
    assert latest(release) == release / "release"
    assert latest(release / "release") == release / "release"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / TRACKER_FILE).write_text("30")
    with pytest.raises(UserError, match="not a complete checkpoint"):
        latest(broken)


# Safetensors directories.


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(1000, generator=g)
    return {
        "a.weight": torch.randn(40, 30, generator=g),
        "b.weight": torch.randn(100, generator=g).to(torch.bfloat16),
        # Views into one buffer, as megatron-core DDP keeps parameters: stored on their own.
        "c.weight": flat[:600].view(20, 30),
        "d.weight": flat[600:].view(20, 20).t(),
        "e.bias": torch.arange(7, dtype=torch.int64),
    }


def test_write_sharded_round_trip_over_several_shards(tmp_path):
    tensors = _tensors()
    out = tmp_path / "model"
    write_sharded(out, iter(tensors.items()), max_shard_bytes=4000)
    index = json.loads((out / INDEX_FILE).read_text())
    files = sorted({*index["weight_map"].values()})
    # a (4800 bytes) alone, then b + c (2600), then d + e (1656).
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in range(1, 4)]
    assert index["weight_map"]["c.weight"] == index["weight_map"]["b.weight"] == files[1]
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert not (out / SINGLE_FILE).exists()
    reader = SafetensorsReader(out)
    assert sorted(reader.names()) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(reader.read(name), tensor), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .tmp / .old left


def test_write_sharded_single_file_replaces_an_existing_directory(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    config = tmp_path / "config.json"
    config.write_text("{}")
    write_sharded(out, iter(_tensors().items()), extra_files=[config])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", SINGLE_FILE]
    assert sorted(SafetensorsReader(out).names()) == sorted(_tensors())


def test_transformers_loads_a_sharded_directory(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_model(SEED)
    out = tmp_path / "model"
    model.config.save_pretrained(tmp_path)
    write_sharded(out, checkpoint_tensors(model), 200_000, extra_files=[tmp_path / "config.json"])
    assert (out / INDEX_FILE).is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    expected = dict(checkpoint_tensors(model))
    for name, tensor in checkpoint_tensors(loaded):
        assert torch.equal(tensor, expected[name]), name


def test_reader_errors_name_the_directory(tmp_path):
    with pytest.raises(UserError, match=re.escape(f"{tmp_path} holds no safetensors weights")):
        SafetensorsReader(tmp_path)
    write_sharded(tmp_path / "m", [("x", torch.zeros(2))])
    with pytest.raises(UserError, match="has no tensor 'y'"):
        SafetensorsReader(tmp_path / "m").read("y")
