"""Bit-exact per-tensor checksums, for the verify mode of a weight sync.

The digest is computed with torch ops on the tensor's own device, so a CUDA tensor is never
copied to the host (only two 64-bit sums per tensor come back), and the same bytes give the same
digest on a CPU and on a GPU. It is a checksum, not a cryptographic hash: each 32-bit word w at
position i contributes (w XOR a*i) * (b*i | 1) modulo 2^64, in two lanes with different odd
constants a, b, and the lanes' sums are the digest. Any single changed word changes both lanes
(the multiplier is odd, so the map is a bijection); moved words change them because the
weights depend on the position; two unrelated corruptions cancel with probability ~2^-128.
Integer sums modulo 2^64 do not depend on the summation order, hence the bit-exactness.
"""

from collections.abc import Iterable, Mapping

import torch

from weights.errors import WeightSyncError, name_list
from weights.manifest import TensorSpec

CHUNK_WORDS = {"cuda": 1 << 24, "cpu": 1 << 14}
"""Words hashed per step, by device type: bounds the temporaries (about 4 x 8 bytes a word). On
the CPU a chunk this small stays in cache and below torch's grain for multi-threading, which
made larger chunks 5-30 times slower on a busy 2-core machine."""

_LANES = ((0x2545F4914F6CDD1D, 0x5851F42D4C957F2D), (0x14057B7EF767814F, 0x27BB2EE687B0B0FD))
_MASK64 = (1 << 64) - 1
_LOW32 = 0xFFFFFFFF


def tensor_checksums(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """`{name: digest}`; the digest also names the dtype and shape, e.g. `float32[4, 8]:9a..`."""
    return {name: _checksum(tensor) for name, tensor in named_tensors}


def compare_checksums(
    expected: Mapping[str, str], actual: Mapping[str, str], *, where: str = "receiver"
) -> None:
    """Raise `WeightSyncError` naming every tensor whose checksum differs or is absent."""
    differing = [n for n in expected if n in actual and actual[n] != expected[n]]
    missing = [n for n in expected if n not in actual]
    extra = [n for n in actual if n not in expected]
    sections = [("differ", differing), ("missing", missing), ("unexpected", extra)]
    found = [(kind, names) for kind, names in sections if names]
    if found:
        lines = [f"weight checksums on the {where} do not match the sender's:"]
        lines += [f"  {len(names)} {kind}: {name_list(names)}" for kind, names in found]
        raise WeightSyncError("\n".join(lines))


def _checksum(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().view(-1).view(torch.uint8)
    sums = torch.zeros(len(_LANES), dtype=torch.int64, device=data.device)
    whole = data.numel() // 4 * 4
    step = 4 * CHUNK_WORDS.get(data.device.type, CHUNK_WORDS["cuda"])
    for start in range(0, whole, step):
        stop = min(whole, start + step)
        words = _as_int32(data[start:stop]).to(torch.int64).bitwise_and_(_LOW32)
        _accumulate(sums, words, start // 4)
    if whole < data.numel():  # 1-3 trailing bytes, one word each, after the last full word
        _accumulate(sums, data[whole:].to(torch.int64), whole // 4)
    lanes = "".join(f"{v & _MASK64:016x}" for v in sums.tolist())
    return f"{TensorSpec.of('', tensor).describe()}:{lanes}"


def _accumulate(sums: torch.Tensor, words: torch.Tensor, first_index: int) -> None:
    index = torch.arange(first_index, first_index + words.numel(), device=words.device)
    for lane, (a, b) in enumerate(_LANES):
        mixed = index.mul(a).bitwise_xor_(words)
        mixed.mul_(index.mul(b).bitwise_or_(1))
        sums[lane] += mixed.sum()


def _as_int32(chunk: torch.Tensor) -> torch.Tensor:
    try:
        return chunk.view(torch.int32)
    except RuntimeError:  # a byte offset not divisible by 4 (e.g. a bf16 view): copy the chunk
        return chunk.clone().view(torch.int32)
