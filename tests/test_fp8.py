"""FP8 rollouts: block-wise quantization, the checkpoint format, the fp8 weight stream, and a
real sync from a TrainActor into a transformers FP8 engine model over gloo, on the CPU.

The quantization error is measured on real weights (the built-in tiny Qwen3-MoE's matrices)
and on a larger random-normal matrix whose shape is no multiple of 128; the figures printed
(`pytest -s`) are the ones docs/fp8.md quotes.
"""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
import torch
from transformers import Qwen3MoeForCausalLM

from actors.train_actor import TrainActor
from config import load_config
from config.errors import UserError
from inference import check_fp8_block_size
from inference.fp8_layers import Fp8Experts, Fp8Linear, emulated_block_fp8_matmul
from inference.fp8_model import (
    build_fp8_model,
    check_fp8_engine_support,
    check_gemm_shapes,
    quantize_modules,
)
from inference.transformers_engine import TransformersEngine
from models.checkpoint_format import checkpoint_tensors
from models.fp8_checkpoint import (
    Fp8Format,
    check_rollout_checkpoint,
    parse_quantization_config,
    read_fp8_format,
    tensor_reader,
)
from models.safetensors_io import SafetensorsReader
from models.tiny import EOS, PAD, VOCAB, build_tiny_model, save_tiny_model, tiny_config
from tools import convert_hf_to_fp8
from weights.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    block_errors,
    dequantize_blockwise,
    quantize_blockwise,
    quantize_blockwise_batch,
    scale_shape,
)
from weights.fp8_export import Fp8Export
from weights.manifest import TensorSpec, check_manifest, manifest_of
from weights.process_group import GroupInfo, pick_master_address_and_port

BLOCK = (128, 128)
E4M3_BOUND = 2.0**-3
"""What every block is held to here; the format's own bound is 2^-4 of the block's amax."""

QWEN3_FP8_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}
"""The quantization_config of Qwen3-30B-A3B-FP8."""

SEED = 5

CPU_MATMUL = emulated_block_fp8_matmul
"""The engine's fp8 arithmetic in fp32: what its modules multiply with on a CPU, here."""


def element_errors(weight: torch.Tensor, block=BLOCK) -> torch.Tensor:
    """|w - dq(q(w))| / amax of the element's block, per element."""
    q, scales = quantize_blockwise(weight, block)
    error = (weight.float() - dequantize_blockwise(q, scales, block)).abs()
    rows, cols = scale_shape(tuple(weight.shape), block)
    padded = torch.zeros(rows * block[0], cols * block[1])
    padded[: weight.shape[0], : weight.shape[1]] = weight.float().abs()
    amax = padded.view(rows, block[0], cols, block[1]).amax(dim=(1, 3)).clamp(min=1e-30)
    amax = amax.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return error / amax[: weight.shape[0], : weight.shape[1]]


# ---- the math ---------------------------------------------------------------------------


def test_quantization_error_of_the_tiny_models_weights_is_within_the_e4m3_bound():
    model = build_tiny_model(SEED)
    fmt = Fp8Format()
    worst, means = 0.0, []
    for name, weight in checkpoint_tensors(model):
        if not fmt.quantizes(name):
            continue
        q, scales = quantize_blockwise(weight, BLOCK)
        assert q.dtype == FP8_DTYPE and q.shape == weight.shape
        assert scales.dtype == torch.float32 and tuple(scales.shape) == (1, 1)  # one partial block
        per_block = block_errors(weight, q, scales, BLOCK)
        worst = max(worst, per_block.max().item())
        means.append(element_errors(weight).mean().item())
        assert scales.item() == pytest.approx(weight.abs().max().item() / FP8_MAX, rel=1e-6)
    assert len(means) == 2 * (4 + 8 * 3)  # per layer: q/k/v/o + 8 experts x gate/up/down
    assert worst < E4M3_BOUND and worst <= 2.0**-4
    mean = sum(means) / len(means)
    assert mean < 2.0**-6
    print(f"tiny model: max block error / amax {worst:.4f}, mean element error / amax {mean:.5f}")


def test_quantization_error_of_a_large_matrix_with_partial_blocks():
    weight = torch.randn(1000, 1300, generator=torch.Generator().manual_seed(0)) * 0.02
    weight = weight.bfloat16()
    q, scales = quantize_blockwise(weight, BLOCK)
    assert tuple(scales.shape) == (8, 11) == scale_shape((1000, 1300), BLOCK)
    assert q.shape == (1000, 1300) and q.is_contiguous()
    per_block = block_errors(weight, q, scales, BLOCK)
    assert per_block.shape == (8, 11) and per_block.max().item() < E4M3_BOUND
    mean = element_errors(weight).mean().item()
    relative = (
        weight.float() - dequantize_blockwise(q, scales, BLOCK)
    ).norm() / weight.float().norm()
    assert mean < 2.0**-6 and relative < 0.05
    # The edge blocks' scales come from their own (partial) elements only.
    assert scales[-1, -1].item() == pytest.approx(
        weight[896:, 1280:].float().abs().max().item() / FP8_MAX, rel=1e-6
    )
    print(
        f"1000 x 1300 N(0, 0.02) bf16: max block error / amax {per_block.max().item():.4f}, "
        f"mean element error / amax {mean:.5f}, relative Frobenius error {relative:.4f}"
    )


def test_a_block_of_zeros_quantizes_to_zeros_without_dividing_by_zero():
    weight = torch.zeros(200, 300)
    weight[130:, 260:] = torch.linspace(-3, 3, 70 * 40).view(70, 40)
    q, scales = quantize_blockwise(weight, BLOCK)
    assert scales[0, 0].item() == 1.0 and scales[1, 2].item() == pytest.approx(3 / FP8_MAX)
    back = dequantize_blockwise(q, scales, BLOCK)
    assert torch.isfinite(back).all() and torch.equal(back[:128], torch.zeros(128, 300))
    assert (back - weight).abs().max().item() <= 3 * 2.0**-4


def test_the_largest_value_of_each_block_is_exact_and_shapes_are_checked():
    weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    q, scales = quantize_blockwise(weight, BLOCK)
    back = dequantize_blockwise(q, scales, BLOCK)
    amax = weight.abs().max()
    where = weight.abs().argmax()
    assert back.view(-1)[where].abs().item() == pytest.approx(amax.item(), rel=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        dequantize_blockwise(q, scales[:1], BLOCK)
    with pytest.raises(ValueError, match="non-empty matrices"):
        quantize_blockwise(torch.randn(4, 4, 4))


def test_a_batch_of_expert_matrices_quantizes_bit_for_bit_as_one_by_one():
    g = torch.Generator().manual_seed(SEED)
    experts = [(torch.randn(256, 128, generator=g) * 0.02).to(torch.bfloat16) for _ in range(6)]
    experts[2][:128, :128] = 0  # a zero block keeps scale 1 in a batch too
    batched = quantize_blockwise_batch(experts, BLOCK)
    for weight, (q, scales) in zip(experts, batched, strict=True):
        alone_q, alone_scales = quantize_blockwise(weight, BLOCK)
        assert torch.equal(q.view(torch.uint8), alone_q.view(torch.uint8))
        assert torch.equal(scales, alone_scales)
    with pytest.raises(ValueError, match="whole blocks"):
        quantize_blockwise_batch([torch.ones(100, 128)] * 2, BLOCK)
    with pytest.raises(ValueError, match="one shape and dtype"):
        quantize_blockwise_batch([torch.ones(128, 128), torch.ones(128, 256)], BLOCK)


def test_the_export_quantizes_runs_of_experts_together_and_keeps_the_order(monkeypatch):
    """The sync's fp8 stream batches each run of same-shape expert matrices, and is the
    one-by-one stream bit for bit, in the same order (bf16 tensors in between included)."""
    import weights.fp8_export as export_module

    fmt = Fp8Format((32, 32))
    weights = list(checkpoint_tensors(build_tiny_model(SEED, torch.bfloat16)))
    batches = []

    def spy(tensors, block):
        batches.append(len(tensors))
        return quantize_blockwise_batch(tensors, block)

    monkeypatch.setattr(export_module, "quantize_blockwise_batch", spy)
    streamed = list(Fp8Export(fmt).tensors(weights))
    one_by_one = []
    for name, tensor in weights:
        if fmt.quantizes(name):
            q, scales = quantize_blockwise(tensor, fmt.block_size)
            one_by_one += [(name, q), (name + "_scale_inv", scales)]
        else:
            one_by_one.append((name, tensor))
    assert [n for n, _ in streamed] == [n for n, _ in one_by_one]
    for (name, got), (_, want) in zip(streamed, one_by_one, strict=True):
        assert got.dtype == want.dtype and torch.equal(got.float(), want.float()), name
    # Per layer: k_proj and v_proj (32 x 64) together, then the 8 experts' gate, up and down
    # projections (all 64 x 64 in the tiny model) in one batch; q_proj and o_proj go alone.
    assert batches == [2, 24, 2, 24]


def test_transformers_own_dequantization_reads_our_scales_the_same_way():
    """transformers' Fp8Dequantize (its loader for FP8 checkpoints) multiplies fp8 by the
    scales we store: the same weights back, bit for bit."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    weight = torch.randn(256, 384, generator=torch.Generator().manual_seed(2))
    q, scales = quantize_blockwise(weight, BLOCK)
    theirs = Fp8Dequantize(None)._dequantize_one(q, scales, output_dtype=torch.float32)
    assert torch.equal(theirs, dequantize_blockwise(q, scales, BLOCK))


# ---- the checkpoint format --------------------------------------------------------------


def test_the_published_qwen3_fp8_config_is_read():
    fmt = parse_quantization_config(QWEN3_FP8_CONFIG, "Qwen3-30B-A3B-FP8/config.json")
    assert fmt.block_size == (128, 128) and fmt.not_converted == ()
    quantized = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.3.mlp.experts.17.gate_proj.weight",
        "model.layers.3.mlp.experts.17.down_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    ]
    kept = [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.3.mlp.gate.weight",  # the router
        "model.layers.0.self_attn.q_proj.bias",
    ]
    assert all(fmt.quantizes(n) for n in quantized)
    assert not any(fmt.quantizes(n) for n in kept)


def test_modules_to_not_convert_and_ignored_layers_match_whole_components():
    for key in ("modules_to_not_convert", "ignored_layers"):
        fmt = parse_quantization_config(
            {**QWEN3_FP8_CONFIG, key: ["lm_head", "model.layers.1.self_attn", "layers.*.mlp.gate"]},
            "x",
        )
        assert not fmt.quantizes("model.layers.1.self_attn.k_proj.weight")
        assert fmt.quantizes("model.layers.10.self_attn.k_proj.weight")  # not layers.1
        assert fmt.quantizes("model.layers.2.mlp.gate_proj.weight")  # mlp.gate is the router
        assert fmt.quantizes("model.layers.2.mlp.experts.0.gate_proj.weight")
    experts = parse_quantization_config(
        {**QWEN3_FP8_CONFIG, "modules_to_not_convert": ["model.layers.0.mlp.experts"]}, "x"
    )
    assert not experts.quantizes("model.layers.0.mlp.experts.5.up_proj.weight")
    assert experts.quantizes("model.layers.1.mlp.experts.5.up_proj.weight")


BAD_CONFIGS = {
    "other method": ({"quant_method": "awq"}, r"quant_method='awq' is not supported.*'fp8'"),
    "other fmt": ({"fmt": "e5m2"}, r"quantization_config.fmt='e5m2' is not supported.*e4m3"),
    "static activations": (
        {"activation_scheme": "static"},
        r"activation_scheme='static' is not supported.*calibration",
    ),
    "no activation scheme": ({"activation_scheme": None}, r"has no activation_scheme"),
    "no block size": ({"weight_block_size": None}, r"has no weight_block_size: per-tensor"),
    "block of three": ({"weight_block_size": [128, 128, 1]}, r"weight_block_size=\[128, 128, 1\]"),
    "block of zero": ({"weight_block_size": [0, 128]}, r"two positive integers"),
    "ue8m0 scales": ({"scale_fmt": "ue8m0"}, r"scale_fmt='ue8m0'.*fp32 scales"),
    "fp8 embeddings": ({"modules_to_convert": ["embed"]}, r"modules_to_convert.*embeddings"),
    "dequantize": ({"dequantize": True}, r"dequantize=true"),
    "unknown key": ({"kv_cache_scheme": "fp8"}, r"has kv_cache_scheme, which Sluice does not"),
    "two different skip lists": (
        {"modules_to_not_convert": ["lm_head"], "ignored_layers": ["x"]},
        r"both modules_to_not_convert and ignored_layers",
    ),
    "skip list of numbers": ({"modules_to_not_convert": [1]}, r"must be a list of module names"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_quantization_configs_are_refused_naming_the_file_and_field(case, tmp_path):
    change, message = BAD_CONFIGS[case]
    entry = {k: v for k, v in {**QWEN3_FP8_CONFIG, **change}.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": entry}))
    with pytest.raises(UserError, match=message) as raised:
        read_fp8_format(tmp_path)
    assert str(raised.value).startswith(f"{tmp_path / 'config.json'}: quantization_config")


def test_a_config_without_quantization_is_bf16(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    assert read_fp8_format(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": "fp8"}))
    with pytest.raises(UserError, match="must be a JSON object"):
        read_fp8_format(tmp_path)


# ---- checkpoints on disk ----------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny model saved as bf16 (fp32 here) and converted by the tool, 32 x 32 blocks (the
    transformers FP8 engine needs the block rows to divide moe_intermediate_size = 64)."""
    root = tmp_path_factory.mktemp("fp8")
    bf16, fp8 = root / "tiny", root / "tiny-FP8"
    save_tiny_model(bf16, SEED)
    assert (
        convert_hf_to_fp8.run(
            [
                *("--hf-checkpoint", str(bf16), "--save", str(fp8)),
                *("--weight-block-size", "32", "32"),
                # The tests quantize their references on the CPU: CUDA's quantization can
                # differ in the last bit of a few elements (seen on an H200).
                *("--device", "cpu"),
            ]
        )
        == 0
    )
    return bf16, fp8


def test_reading_an_fp8_checkpoint_for_training_dequantizes_it(checkpoints):
    bf16, fp8 = checkpoints
    fmt = read_fp8_format(fp8)
    read = tensor_reader(SafetensorsReader(fp8), fmt, torch.float32)
    original = SafetensorsReader(bf16)
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    weight = original.read(name)
    q, scales = quantize_blockwise(weight, fmt.block_size)
    assert torch.equal(read(name), dequantize_blockwise(q, scales, fmt.block_size))
    assert torch.equal(read("model.norm.weight"), original.read("model.norm.weight"))


def run_config(fp8: Path, **overrides: str):
    return load_config(None, {"model.hf_checkpoint": str(fp8), **overrides})


def test_an_fp8_rollout_checkpoint_needs_the_trainers_bf16_weights(checkpoints, tmp_path):
    bf16, fp8 = checkpoints
    with pytest.raises(UserError, match=r"is an FP8 checkpoint.*model.train_checkpoint.*--load"):
        check_rollout_checkpoint(run_config(fp8))
    paired = run_config(fp8, **{"model.train_checkpoint": str(bf16)})
    assert check_rollout_checkpoint(paired).block_size == (32, 32)
    seed_way = run_config(fp8, **{"train.backend": "megatron", "checkpoint.load": str(tmp_path)})
    assert check_rollout_checkpoint(seed_way) is not None
    with pytest.raises(UserError, match="is itself a quantized checkpoint"):
        check_rollout_checkpoint(run_config(fp8, **{"model.train_checkpoint": str(fp8)}))
    other = tmp_path / "other"
    shutil.copytree(bf16, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(UserError, match=r"not the same model.*num_hidden_layers 2 vs 3"):
        check_rollout_checkpoint(run_config(fp8, **{"model.train_checkpoint": str(other)}))
    with pytest.raises(UserError, match=r"only for an FP8 model\.hf_checkpoint"):
        check_rollout_checkpoint(run_config(bf16, **{"model.train_checkpoint": str(bf16)}))


def test_the_transformers_fp8_engine_refuses_a_cpu_naming_what_it_needs(checkpoints):
    _, fp8 = checkpoints
    fmt = read_fp8_format(fp8)
    with pytest.raises(UserError, match=r"compute capability >= 9\.0.*runs on cpu"):
        check_fp8_engine_support(run_config(fp8).model, fmt, torch.device("cpu"))


def test_the_transformers_fp8_engine_needs_128_blocks_and_aligned_matrices(checkpoints):
    _, fp8 = checkpoints  # 32 x 32 blocks
    with pytest.raises(UserError, match=r"weight_block_size is \[32, 32\].*only \[128, 128\]"):
        check_fp8_block_size(read_fp8_format(fp8))
    # 128 x 128 blocks, but the tiny model's 64-wide projections are no whole blocks.
    config = tiny_config()
    config.moe_intermediate_size = 128
    wide = Qwen3MoeForCausalLM(config)
    quantize_modules(wide, Fp8Format(), emulated_block_fp8_matmul)
    with pytest.raises(UserError, match=r"q_proj.weight is 64 x 64.*multiple of 128"):
        check_gemm_shapes(wide, Fp8Format())


def test_transformers_fp8_modules_need_block_rows_dividing_the_expert_size(tmp_path):
    build_tiny_model(SEED).config.save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"block rows \(128.*moe_intermediate_size \(64\)"):
        build_fp8_model(run_config(tmp_path).model, Fp8Format(), torch.device("cpu"), CPU_MATMUL)


# ---- the fp8 stream and a real sync -----------------------------------------------------


def test_the_export_carries_fp8_dtypes_and_scales_in_the_plan(checkpoints):
    _, fp8 = checkpoints
    fmt = read_fp8_format(fp8)
    trainer = manifest_of(checkpoint_tensors(build_tiny_model(SEED)))
    specs = Fp8Export(fmt).specs(trainer)
    by_name = {s.name: s for s in specs}
    q = by_name["model.layers.0.self_attn.k_proj.weight"]
    scales = by_name["model.layers.0.self_attn.k_proj.weight_scale_inv"]
    assert (q.dtype, q.shape) == ("float8_e4m3fn", (32, 64))
    assert (scales.dtype, scales.shape) == ("float32", (1, 2))
    assert by_name["model.layers.0.mlp.gate.weight"].dtype == "float32"
    assert len(specs) == len(trainer) + 56
    names = [name for name, _ in Fp8Export(fmt).tensors(checkpoint_tensors(build_tiny_model(1)))]
    assert names == [s.name for s in specs]  # the stream follows its specs, in order
    # ... and matches the checkpoint the tool wrote, name by name.
    reader = SafetensorsReader(fp8)
    stored = {n: (str(reader.dtype(n)), reader.shape(n)) for n in reader.names()}
    wire = {"F8_E4M3": "float8_e4m3fn", "F32": "float32"}
    assert {s.name: (s.dtype, s.shape) for s in specs} == {
        n: (wire[d], shape) for n, (d, shape) in stored.items()
    }


def test_a_transformers_fp8_engine_model_has_the_checkpoints_manifest(checkpoints):
    _, fp8 = checkpoints
    fmt = read_fp8_format(fp8)
    model = build_fp8_model(run_config(fp8).model, fmt, torch.device("cpu"), CPU_MATMUL)
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, Fp8Linear | Fp8Experts)}
    assert kinds == {"Fp8Linear", "Fp8Experts"} and model.lm_head.weight.dtype == torch.float32
    reader = SafetensorsReader(fp8)
    check_manifest(
        manifest_of(checkpoint_tensors(model)),
        [TensorSpec.of(n, reader.read(n)) for n in reader.names()],
    )


def test_the_fp8_engine_model_computes_the_model_of_its_dequantized_weights(checkpoints):
    """Fp8Linear / Fp8Experts wired into the model: with activations left unrounded they give
    the logits of the float model holding the dequantized weights; with the engine's
    arithmetic (activations rounded to e4m3 per 1 x block) they stay close to them."""
    _, fp8 = checkpoints
    fmt = read_fp8_format(fp8)
    trained = build_tiny_model(SEED)
    reference = build_tiny_model(SEED)
    with torch.no_grad():
        held = dict(checkpoint_tensors(reference))
        sent = dict(Fp8Export(fmt).tensors(checkpoint_tensors(trained)))
        for name in held:
            if fmt.quantizes(name):
                held[name].copy_(
                    dequantize_blockwise(sent[name], sent[name + "_scale_inv"], fmt.block_size)
                )

    def unrounded(x, weight, scale_inv, block):
        return x @ dequantize_blockwise(weight, scale_inv, block).t()

    ids = torch.tensor([[3, 5, 7, 13, 4, 9, 9, 2], [12, 11, 3, 3, 6, 13, 8, 5]])
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        logits = {}
        for label, matmul in (("unrounded", unrounded), ("engine", CPU_MATMUL)):
            model = build_fp8_model(run_config(fp8).model, fmt, torch.device("cpu"), matmul)
            dests = dict(checkpoint_tensors(model))
            for name, tensor in sent.items():
                dests[name].copy_(tensor)
            logits[label] = model(input_ids=ids).logits
    torch.testing.assert_close(logits["unrounded"], want, rtol=1e-5, atol=1e-5)
    error = (logits["engine"] - want).abs().mean() / want.abs().mean()
    print(f"fp8 activations: mean |logit error| {error:.4f} of mean |logit|")
    assert 0 < error < 0.05


def test_a_train_actor_syncs_fp8_weights_into_a_transformers_fp8_engine(checkpoints):
    """TrainActor (torch backend on the bf16 twin) -> gloo -> TransformersEngine holding
    `Fp8Linear` / `Fp8Experts`: the engine's fp8 weights and scales equal the
    trainer's quantized ones bit for bit, before and after the trainer's weights change."""
    bf16, fp8 = checkpoints
    config = run_config(fp8, **{"model.train_checkpoint": str(bf16)})
    # A TrainActor asks Ray for its GPUs; in this plain process that needs a local Ray.
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    trainer = TrainActor(config, rank=0, world_size=1)
    address, port = pick_master_address_and_port()
    trainer.init_process_group(address, port)
    fmt = read_fp8_format(fp8)
    engine = TransformersEngine(
        build_fp8_model(config.model, fmt, torch.device("cpu"), CPU_MATMUL),
        eos_token_id=VOCAB.index(EOS),
        pad_token_id=VOCAB.index(PAD),
    )
    try:
        plan = trainer.weight_plan(bucket_bytes=16 * 1024)
        assert {s.dtype for b in plan for s in b.specs} == {"float8_e4m3fn", "float32"}
        address, port = pick_master_address_and_port()
        info = GroupInfo(address, port, world_size=2, backend="gloo", timeout_s=30)
        before = None
        for version in (1, 2):
            with ThreadPoolExecutor(2) as pool:
                if version == 1:
                    joins = [
                        pool.submit(trainer.init_weights_update_group, info),
                        pool.submit(engine.init_weights_update_group, info, 1),
                    ]
                    [j.result(timeout=60) for j in joins]
                engine.check_weights_update(plan)
                sent = pool.submit(trainer.broadcast_weights, plan, version)
                got = pool.submit(engine.update_weights_from_distributed, plan, version)
                stats, _ = sent.result(timeout=60), got.result(timeout=60)
            assert stats.nbytes == sum(b.nbytes for b in plan)
            received = engine.weight_checksums()
            assert received == trainer.weight_checksums() and received != before
            before = received
            weights = dict(checkpoint_tensors(engine.model))
            for name, trained in trainer.backend.named_weights():
                if fmt.quantizes(name):
                    assert weights[name].dtype == FP8_DTYPE
                    back = dequantize_blockwise(
                        weights[name], weights[name + "_scale_inv"], fmt.block_size
                    )
                    assert (back - trained).abs().max() <= trained.abs().max() * 2.0**-4
                else:
                    assert torch.equal(weights[name], trained), name
            with torch.no_grad():  # the next "step": every trainer weight changes
                for p in trainer.backend.model.parameters():
                    p.add_(torch.randn_like(p) * 0.01)
    finally:
        engine.shutdown()
        trainer.shutdown()
        ray.shutdown()


def test_megatron_reads_trainer_weights_from_the_bf16_twin_or_dequantized(checkpoints, tmp_path):
    """Megatron fills its model from the trainers' checkpoint: the bf16 twin when given; from
    the FP8 directory itself (the seed's --load case, and a KL reference model) dequantized."""
    from training.megatron.backend import _checkpoint_reader

    bf16, fp8 = checkpoints
    name = "model.layers.0.self_attn.q_proj.weight"
    original = SafetensorsReader(bf16).read(name)
    twin = run_config(fp8, **{"model.train_checkpoint": str(bf16)})
    assert torch.equal(_checkpoint_reader(twin)(name), original)
    seed_way = run_config(fp8, **{"train.backend": "megatron", "checkpoint.load": str(tmp_path)})
    read = _checkpoint_reader(seed_way)(name)
    q, scales = quantize_blockwise(original, (32, 32))
    assert torch.equal(read, dequantize_blockwise(q, scales, (32, 32)))
    assert not torch.equal(read, original)


def test_the_dry_run_shows_fp8_rollouts_and_refuses_what_the_engines_cannot_serve(
    checkpoints, capsys
):
    import driver

    bf16, fp8 = checkpoints  # 32 x 32 blocks
    flags = ["--dry-run", "--hf-checkpoint", str(fp8), "--model.train_checkpoint", str(bf16)]
    sglang = ["--cluster", "1x8", "--rollout.engine", "sglang"]
    assert driver.main([*flags, *sglang]) == 0
    out = capsys.readouterr().out
    assert "# rollout weights: fp8 e4m3 in 32x32 blocks" in out
    assert "TIS on, cap 2; ratio denominator: recompute" in out
    assert driver.main([*flags, *sglang, "--algorithm.old_log_probs", "rollout"]) == 0
    assert "TIS off; ratio denominator: rollout" in capsys.readouterr().out
    # The transformers engine: fp8 needs GPUs, and on them cuBLAS's 128 x 128 blocks.
    assert driver.main([*flags, "--cluster", "1x0"]) == 2
    assert "places the engines on CPUs" in capsys.readouterr().err
    assert driver.main([*flags, "--cluster", "1x8"]) == 2
    assert "weight_block_size is [32, 32]" in capsys.readouterr().err
