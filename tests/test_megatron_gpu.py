"""The Megatron torch spec's GPU kernels against plain arithmetic, on one GPU (bf16).

On the CPU the torch spec runs its reference paths (a loop over experts, eager elementwise
functions), which tests/test_megatron.py holds to megatron-core's local spec within 1e-5. On a
Hopper GPU it runs other code: torch's grouped GEMM for the experts, compiled RMSNorm and
SwiGLU, flash / cuDNN attention through SDPA. These tests hold those to the same arithmetic
in fp32, and the whole spec to megatron-core's local spec on the same GPU.
"""

import os
import socket

import pytest
import torch

from tests.megatron.layouts import layout_config, rollout_rows

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.megatron,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
        reason="needs a CUDA GPU of compute capability >= 9.0 (torch's grouped GEMM)",
    ),
]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.fixture(scope="module")
def world():
    """A one-rank NCCL world, as torchrun would start it."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    yield torch.device("cuda", 0)
    dist.destroy_process_group()


def build_backend(device, layer_spec: str):
    from megatron.core import parallel_state

    from training.megatron.backend import MegatronBackend

    parallel_state.destroy_model_parallel()
    config = layout_config("tp1-bf16", 1)
    config.train.layer_spec = layer_spec
    return MegatronBackend(config, device)


def test_grouped_experts_equal_a_loop_over_experts_in_fp32(world):
    backend = build_backend(world, "torch")
    experts = backend.model.module.decoder.layers[0].mlp.experts
    generator = torch.Generator(device=world).manual_seed(0)
    counts = torch.tensor([5, 0, 17, 3, 9, 1, 0, 29][: experts.num_local_experts])
    hidden = torch.randn(int(counts.sum()), experts.gate_up_weight.shape[2], device=world,
                         generator=generator).bfloat16().requires_grad_()  # fmt: skip
    probs = torch.rand(hidden.shape[0], device=world, generator=generator)
    backend.model.zero_grad_buffer()  # megatron-core DDP adds gradients into `main_grad`
    out, _ = experts(hidden, counts, probs)
    grad = torch.randn_like(out)
    out.backward(grad)

    x = hidden.detach().float().requires_grad_()
    w1 = experts.gate_up_weight.detach().float().requires_grad_()
    w2 = experts.down_weight.detach().float().requires_grad_()
    rows = []
    split = counts.tolist()
    for e, (part, p) in enumerate(zip(x.split(split), probs.split(split), strict=True)):
        gate, up = (part @ w1[e].T).chunk(2, dim=-1)
        rows.append((torch.nn.functional.silu(gate) * up * p[:, None]) @ w2[e].T)
    expected = torch.cat(rows)
    expected.backward(grad.float())
    assert relative_error(out, expected) < 2e-2
    assert relative_error(hidden.grad, x.grad) < 2e-2
    assert relative_error(experts.gate_up_weight.main_grad, w1.grad) < 2e-2
    assert relative_error(experts.down_weight.main_grad, w2.grad) < 2e-2


def test_compiled_norm_and_swiglu_equal_their_eager_arithmetic(world):
    from training.megatron.fused import (
        fused_rms_norm,
        fused_weighted_swiglu,
        rms_norm,
        weighted_swiglu,
    )

    generator = torch.Generator(device=world).manual_seed(1)
    for rows in (7, 300):  # two shapes: compiled once, for dynamic shapes
        x = torch.randn(rows, 256, device=world, generator=generator).bfloat16()
        weight = torch.rand(256, device=world, generator=generator).bfloat16()
        probs = torch.rand(rows, device=world, generator=generator)
        for fused, eager, args in (
            (fused_rms_norm, rms_norm, (weight, 1e-6)),
            (fused_weighted_swiglu, weighted_swiglu, (probs,)),
        ):
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            out, ref = fused(a, *args), eager(b, *args)
            assert relative_error(out, ref) < 1e-2
            grad = torch.randn_like(ref)
            out.backward(grad)
            ref.backward(grad)
            assert relative_error(a.grad, b.grad) < 1e-2


def test_torch_spec_trains_like_the_local_spec_on_the_gpu(world):
    batches = rollout_rows()
    normalizer = float(sum(b.column("loss_mask").flatten().to_numpy().sum() for b in batches))
    results = {}
    for spec in ("local", "torch"):
        backend = build_backend(world, spec)
        log_probs = torch.cat(backend.compute_log_probs(batches))
        losses = [backend.train(batches, normalizer).loss for _ in range(3)]
        results[spec] = log_probs, losses
        inner = backend.optimizer.optimizer  # torch's AdamW, fused (training/megatron/backend.py)
        assert all(group["fused"] for group in inner.param_groups)
    (lp_local, loss_local), (lp_torch, loss_torch) = results["local"], results["torch"]
    assert (lp_torch - lp_local).abs().mean().item() < 2e-2
    assert loss_torch == pytest.approx(loss_local, rel=5e-2, abs=1e-3)
    assert loss_torch[0] != loss_torch[-1], "training must change the loss"
