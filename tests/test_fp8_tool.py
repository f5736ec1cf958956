"""tools/convert_hf_to_fp8.py, run as a user runs it (a subprocess) on a saved tiny model.

What it writes is what the weight sync sends: the same names, dtypes and shapes as the
trainer's fp8 plan and the same bytes; its config.json is read back as an FP8 rollout format;
the Megatron converter refuses it with the seed's reason; every mistake on the command line
is one `error:` line and exit code 2, with nothing written.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.checkpoint_format import checkpoint_tensors
from models.fp8_checkpoint import read_fp8_format
from models.safetensors_io import SINGLE_FILE
from models.tiny import build_tiny_model, build_tokenizer, save_tiny_model
from weights.fp8_export import Fp8Export
from weights.manifest import manifest_of

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "convert_hf_to_fp8.py"
TO_TORCH_DIST = ROOT / "tools" / "convert_hf_to_torch_dist.py"
SEED = 13


def run(*args, tool: Path = TOOL) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(tool), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "tiny"
    save_tiny_model(directory, SEED)
    return directory


@pytest.fixture(scope="module")
def fp8_dir(bf16_dir, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("fp8") / "tiny-FP8"
    done = run("--hf-checkpoint", bf16_dir, "--save", save, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "56 weights in fp8 (128x128 blocks" in done.stdout
    return save


def test_the_checkpoint_holds_what_the_sync_sends(fp8_dir):
    model = build_tiny_model(SEED)
    fmt = read_fp8_format(fp8_dir)
    assert fmt.block_size == (128, 128)
    sent = dict(Fp8Export(fmt).tensors(checkpoint_tensors(model)))
    stored = load_file(fp8_dir / SINGLE_FILE)
    specs = Fp8Export(fmt).specs(manifest_of(checkpoint_tensors(model)))
    assert [s.name for s in specs] == list(sent)
    assert {s.name: (s.dtype, s.shape) for s in specs} == {
        n: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in stored.items()
    }
    for name, tensor in sent.items():  # byte for byte
        assert torch.equal(stored[name].view(torch.uint8), tensor.view(torch.uint8)), name
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert stored[q_proj].dtype == torch.float8_e4m3fn
    assert stored[q_proj + "_scale_inv"].shape == (1, 1)  # a 64 x 64 matrix: one partial block
    assert stored["model.layers.1.mlp.gate.weight"].dtype == torch.float32


def test_the_config_tokenizer_and_directory(fp8_dir, bf16_dir):
    config = json.loads((fp8_dir / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": [
            "lm_head",
            "model.embed_tokens",
            "model.layers.0.mlp.gate",
            "model.layers.1.mlp.gate",
        ],
    }
    original = json.loads((bf16_dir / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == original
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fp8_dir)
    assert tokenizer.encode("1 2 =") == build_tokenizer().encode("1 2 =")
    assert (fp8_dir / "generation_config.json").is_file()
    assert sorted(p.name for p in fp8_dir.parent.iterdir()) == ["tiny-FP8"]  # no .tmp left


def test_modules_to_not_convert_stay_bf16_and_the_sync_agrees(bf16_dir, tmp_path):
    save = tmp_path / "partial"
    kept = "model.layers.1.self_attn"
    done = run("--hf-checkpoint", bf16_dir, "--save", save, "--modules-to-not-convert", kept)
    assert done.returncode == 0, done.stderr
    fmt = read_fp8_format(save)
    assert kept in fmt.not_converted
    stored = load_file(save / SINGLE_FILE)
    assert stored["model.layers.1.self_attn.v_proj.weight"].dtype == torch.float32
    assert "model.layers.1.self_attn.v_proj.weight_scale_inv" not in stored
    assert stored["model.layers.0.self_attn.v_proj.weight"].dtype == torch.float8_e4m3fn
    specs = Fp8Export(fmt).specs(manifest_of(checkpoint_tensors(build_tiny_model(SEED))))
    assert {s.name for s in specs} == set(stored)


def test_converting_our_fp8_checkpoint_to_torch_dist_is_refused(fp8_dir, tmp_path):
    save = tmp_path / "torch_dist"
    done = run("--hf-checkpoint", fp8_dir, "--save", save, tool=TO_TORCH_DIST)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "quant_method=fp8" in done.stderr and "bf16 Hugging Face checkpoint" in done.stderr
    assert "Qwen3-30B-A3B-FP8" in done.stderr and "Traceback" not in done.stderr
    assert not save.exists()


def error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_command_line_mistakes_are_one_error_line(bf16_dir, fp8_dir, tmp_path):
    save = tmp_path / "out"
    cases = {
        "required: --hf-checkpoint": ("--save", save),
        "already has a quantization_config (quant_method=fp8)": (
            "--hf-checkpoint",
            fp8_dir,
            "--save",
            save,
        ),
        "is not a Hugging Face model directory": ("--hf-checkpoint", tmp_path, "--save", save),
        "--weight-block-size [0, 128] must be positive": (
            "--hf-checkpoint",
            bf16_dir,
            "--save",
            save,
            "--weight-block-size",
            "0",
            "128",
        ),
        "--save must differ": ("--hf-checkpoint", bf16_dir, "--save", bf16_dir),
        "not a device": ("--hf-checkpoint", bf16_dir, "--save", save, "--device", "tpu:x"),
    }
    for expected, args in cases.items():
        assert expected in error_line(run(*args)), expected
    assert not save.exists()
