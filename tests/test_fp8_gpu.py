"""The transformers FP8 engine on a GPU: cuBLAS's block fp8 GEMM against the same arithmetic
in fp32, on the shapes that need padding; `Fp8Linear` / `Fp8Experts` on CUDA take an fp8 sync
and generate with log-probs close to bf16's.

Skipped with the reason on a machine without a CUDA GPU of compute capability >= 9.0.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import Qwen3MoeForCausalLM

from config import load_config
from inference import create_engine
from inference.engine import SamplingParams
from inference.fp8_layers import block_fp8_matmul, emulated_block_fp8_matmul
from inference.fp8_model import build_fp8_model, fp8_device_problem, fp8_kernel_problem
from models.checkpoint_format import checkpoint_tensors
from models.fp8_checkpoint import read_fp8_format
from models.tiny import build_tiny_model, build_tokenizer, fp8_gemm_config
from rl.grpo import log_probs_from_logits
from tools import convert_hf_to_fp8
from weights.fp8 import FP8_DTYPE, dequantize_blockwise, quantize_blockwise
from weights.fp8_export import Fp8Export
from weights.manifest import manifest_of, plan_buckets
from weights.process_group import GroupInfo, init_weights_update_group, pick_master_address_and_port
from weights.sync import WeightReceiver, WeightSender

pytestmark = pytest.mark.gpu


def fp8_gpu() -> torch.device:
    """cuda:0 when it can run the block fp8 GEMM, else the test is skipped."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU of compute capability >= 9.0 (cuBLAS's block fp8 GEMM)")
    device = torch.device("cuda", 0)
    problem = fp8_device_problem(device)
    if problem:
        pytest.skip(f"needs a CUDA GPU of compute capability >= 9.0: {problem}")
    return device


def small_qwen3_moe() -> Qwen3MoeForCausalLM:
    """A real Qwen3-MoE whose projections tile into 128 x 128 blocks, with logits far enough
    from uniform (init std 0.1) that rounding shows in the log-probs."""
    config = fp8_gemm_config()
    config.initializer_range = 0.1
    return build_tiny_model(0, torch.bfloat16, config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 7, 64, 333])
@pytest.mark.parametrize(("out", "width"), [(256, 256), (2048, 768), (1536, 2048)])
def test_the_block_fp8_gemm_computes_its_arithmetic_on_shapes_it_pads(rows, out, width, dtype):
    """cuBLAS's block fp8 GEMM against the same quantize-dequantize-multiply in fp32. Rows that
    are no multiple of 4 and widths that are no multiple of 4 blocks (768: Qwen3-30B-A3B's
    expert width) are padded, which cuBLAS needs: unpadded, it refused the rows and returned
    wrong numbers for the widths (measured on an H200)."""
    device = fp8_gpu()
    assert fp8_kernel_problem(device, dtype) is None
    generator = torch.Generator(device).manual_seed(rows + out + width)
    x = torch.randn(rows, width, device=device, generator=generator).to(dtype)
    w = torch.randn(out, width, device=device, generator=generator) * 0.02
    weight, scales = quantize_blockwise(w, (128, 128))
    got = block_fp8_matmul(x, weight, scales, (128, 128)).float()
    want = emulated_block_fp8_matmul(x.float(), weight, scales, (128, 128))
    assert (
        got.shape == (rows, out) and block_fp8_matmul(x, weight, scales, (128, 128)).dtype == dtype
    )
    assert ((got - want).abs().max() / want.abs().max()).item() < 2.0**-7  # bf16 output
    exact = x.float() @ w.t()  # and both are the unquantized product, up to fp8 rounding
    assert ((want - exact).norm() / exact.norm()).item() < 0.1


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    fp8_gpu()
    root = tmp_path_factory.mktemp("fp8_gpu")
    small_qwen3_moe().save_pretrained(root / "bf16")
    build_tokenizer().save_pretrained(root / "bf16")
    argv = ["--hf-checkpoint", str(root / "bf16"), "--save", str(root / "fp8"), "--device", "cuda"]
    assert convert_hf_to_fp8.run(argv) == 0
    return root / "bf16", root / "fp8"


def sync(weights: list[tuple[str, torch.Tensor]], engine_model: torch.nn.Module, fmt) -> None:
    """Trainer -> engine over gloo (both in this process), as a colocated pair does."""
    export = Fp8Export(fmt)
    plan = plan_buckets(export.specs(manifest_of(weights)), 1 << 20)
    address, port = pick_master_address_and_port()
    info = GroupInfo(address, port, world_size=2, backend="gloo", timeout_s=60)
    with ThreadPoolExecutor(2) as pool:
        sender = pool.submit(init_weights_update_group, info, 0)
        receiver = pool.submit(init_weights_update_group, info, 1)
        sender, receiver = WeightSender(sender.result()), receiver.result()
        receiver = WeightReceiver(receiver, dict(checkpoint_tensors(engine_model)))
        receiver.check(plan)
        sent = pool.submit(sender.send, plan, export.tensors(weights), 1)
        got = pool.submit(receiver.receive, plan, 1)
        sent.result(timeout=120), got.result(timeout=120)
    sender.group.close()
    receiver.group.close()


def test_the_fp8_engine_modules_on_the_gpu_take_an_fp8_sync(dirs):
    device = fp8_gpu()
    _, fp8 = dirs
    config = load_config(None, {"model.hf_checkpoint": str(fp8), "model.dtype": "bfloat16"})
    fmt = read_fp8_format(fp8)
    engine_model = build_fp8_model(config.model, fmt, device)
    trained = small_qwen3_moe().to(device)
    weights = [(n, t.contiguous()) for n, t in checkpoint_tensors(trained)]
    sync(weights, engine_model, fmt)
    held = dict(checkpoint_tensors(engine_model))
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    assert held[name].dtype == FP8_DTYPE and held[name].device.type == "cuda"
    back = dequantize_blockwise(held[name], held[name + "_scale_inv"], fmt.block_size)
    original = dict(weights)[name].float()
    assert (back - original).abs().max() <= original.abs().max() * 2.0**-4
    assert torch.equal(held["lm_head.weight"], dict(weights)["lm_head.weight"])


def test_the_fp8_engine_generates_with_log_probs_close_to_bf16(dirs):
    """The fp8 engine's log-probs against the bf16 trainer's, and against the bf16 model that
    holds the same fp8-rounded weights: the engine is nearer the latter (its difference there
    is the activations' rounding alone), and near the trainer in the magnitude the fp8 bench
    measured for the weights' rounding (0.17 at Qwen3-30B-A3B's widths)."""
    device = fp8_gpu()
    bf16, fp8 = dirs
    config = load_config(
        None,
        {
            "model.hf_checkpoint": str(fp8),
            "model.train_checkpoint": str(bf16),
            "model.dtype": "bfloat16",
        },
    )
    fmt = read_fp8_format(fp8)
    engine = create_engine(config, device)
    trained = small_qwen3_moe().to(device).eval()
    weights = [(n, t.contiguous()) for n, t in checkpoint_tensors(trained)]
    sync(weights, engine.model, fmt)
    rounded = small_qwen3_moe().to(device).eval()
    with torch.no_grad():
        held = dict(checkpoint_tensors(rounded))
        for name, tensor in weights:
            if fmt.quantizes(name):
                q, scales = quantize_blockwise(tensor, fmt.block_size)
                held[name].copy_(dequantize_blockwise(q, scales, fmt.block_size))
    prompts = [[3 + (i % 10), 4 + (i % 9), 13] for i in range(16)]
    torch.manual_seed(0)
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=8))
    diffs = {"trainer": [], "rounded": []}
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = torch.tensor([prompt + completion.token_ids], device=device)
        served = torch.tensor(completion.log_probs)
        for label, model in (("trainer", trained), ("rounded", rounded)):
            with torch.no_grad():
                logits = model(input_ids=ids).logits[:, :-1]
            lp = log_probs_from_logits(logits, ids[:, 1:], 1.0)[0, len(prompt) - 1 :]
            diffs[label] += (lp.cpu() - served).abs().tolist()
    mean = {label: sum(d) / len(d) for label, d in diffs.items()}
    print(
        f"fp8 engine: mean |dlogp| vs bf16 trainer {mean['trainer']:.4f} (max "
        f"{max(diffs['trainer']):.4f}), vs the fp8-rounded weights in bf16 {mean['rounded']:.4f}"
    )
    assert 0 < mean["rounded"] < mean["trainer"] < 0.3
