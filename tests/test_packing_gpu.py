"""Packed attention on a GPU (`train.pack_sequences`): bf16 runs torch's flash varlen kernel,
checked against the per-sequence path in fp32, alone and inside the transformers model."""

import numpy as np
import pytest
import torch

from models.tiny import build_tiny_model
from training.varlen_attention import causal_varlen_attention, use_in_transformers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_flash_varlen_attention_equals_attention_per_sequence():
    """Output and gradients of the flash kernel (bf16, grouped heads) against SDPA per
    sequence in fp32 on the CPU, to bf16 rounding; a length-1 sequence included."""
    g = torch.Generator().manual_seed(0)
    lengths = [700, 1, 33, 2048, 130]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), h, 128, generator=g) for h in (32, 4, 4))
    outs, grads = [], []
    for dtype, device in ((torch.bfloat16, "cuda"), (torch.float32, "cpu")):
        inputs = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
        out = causal_varlen_attention(*inputs, cu, max(lengths), scale=128**-0.5)
        out.float().square().sum().backward()
        outs.append(out.float().cpu())
        grads.append([t.grad.float().cpu() for t in inputs])
    assert relative_error(outs[0], outs[1]) < 1e-2
    for a, b in zip(*grads, strict=True):
        assert relative_error(a, b) < 2e-2


def test_the_packed_model_on_a_gpu_gives_each_rows_own_logits():
    """The built-in model in bf16: one packed row through the registered attention gives
    each row the logits it gets alone (SDPA, unpacked), to bf16 rounding."""
    model = build_tiny_model(0, torch.bfloat16).cuda()
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 14, (n,), generator=g) for n in (40, 7, 63, 1, 25)]
    with torch.no_grad():
        alone = [model(input_ids=r[None].cuda()).logits[0] for r in rows]
        use_in_transformers(model)
        cu = torch.tensor([0, *np.cumsum([len(r) for r in rows])], dtype=torch.int32)
        positions = torch.cat([torch.arange(len(r)) for r in rows])[None].cuda()
        packed = model(
            input_ids=torch.cat(rows)[None].cuda(),
            position_ids=positions,
            cu_seq_lens_q=cu.cuda(),
            max_length_q=max(len(r) for r in rows),
        ).logits[0]
    assert relative_error(packed, torch.cat(alone)) < 2e-2
