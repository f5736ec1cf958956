"""What a weight transfer carries: tensor specs, the bucket plan, and the manifest check.

These are the typed messages that cross process boundaries (through Ray) before any byte of
weight data moves: the trainer plans the buckets from its tensors' specs, the driver hands the
plan to every engine, and each engine checks it against its own model.

A bucket's wire layout is the raw bytes of its tensors concatenated in plan order with no
padding, which is also SGLang's `load_format="flattened_bucket"` layout: one `Bucket` maps to one
`POST /update_weights_from_distributed` with `names`, `dtypes` and `shapes` taken from it. Every
tensor starts at a byte offset that is a multiple of its dtype's size, since SGLang views each
slice of the buffer as its dtype and refuses a bucket where one is not (`plan_buckets`).
"""

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from math import prod

import torch

from weights.errors import WeightSyncError, name_list


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor, enough to allocate and check it on a receiver."""

    name: str
    """Hugging Face parameter name, e.g. `model.layers.0.mlp.gate.weight`."""

    dtype: str
    """torch dtype without the `torch.` prefix (`float32`, `bfloat16`), as SGLang spells it."""

    shape: tuple[int, ...]
    """Sizes of every dimension; `()` for a scalar."""

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "TensorSpec":
        """The spec of a live tensor."""
        return cls(name, dtype_name(tensor.dtype), tuple(tensor.shape))

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype as a `torch.dtype`."""
        return torch_dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data when it is contiguous."""
        return prod(self.shape) * self.torch_dtype.itemsize

    def describe(self) -> str:
        """Dtype and shape as people read them: `float32[64, 16]`."""
        return f"{self.dtype}[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class Bucket:
    """Tensors that travel together as one contiguous byte buffer (one broadcast)."""

    specs: tuple[TensorSpec, ...]
    """The tensors, in the order their bytes follow each other in the buffer."""

    nbytes: int
    """Total bytes of the buffer: the sum of the specs' nbytes (no padding between them)."""

    @property
    def names(self) -> list[str]:
        """Tensor names, as SGLang's `UpdateWeightsFromDistributedReqInput.names`."""
        return [s.name for s in self.specs]

    @property
    def dtypes(self) -> list[str]:
        """Dtype names, as SGLang's `UpdateWeightsFromDistributedReqInput.dtypes`."""
        return [s.dtype for s in self.specs]

    @property
    def shapes(self) -> list[list[int]]:
        """Shapes, as SGLang's `UpdateWeightsFromDistributedReqInput.shapes`."""
        return [list(s.shape) for s in self.specs]

    @property
    def sizes(self) -> list[int]:
        """Bytes of each tensor, in order."""
        return [s.nbytes for s in self.specs]

    def slices(self) -> list[tuple[TensorSpec, int, int]]:
        """Each spec with the byte range `[start, end)` it occupies in the buffer."""
        out, start = [], 0
        for spec in self.specs:
            out.append((spec, start, start + spec.nbytes))
            start += spec.nbytes
        return out


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `bfloat16`."""
    return str(dtype).removeprefix("torch.")


@cache  # called per tensor per sync: keep it a dict lookup
def torch_dtype(name: str) -> torch.dtype:
    """`bfloat16` (or `torch.bfloat16`) -> `torch.bfloat16`; raises on an unknown name."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise WeightSyncError(f"unknown dtype {name!r} in a weight manifest")
    return dtype


def manifest_of(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[TensorSpec]:
    """The specs of `(name, tensor)` pairs, in order (e.g. `model.named_parameters()`)."""
    return [TensorSpec.of(name, tensor) for name, tensor in named_tensors]


def plan_buckets(specs: Iterable[TensorSpec], bucket_bytes: int) -> list[Bucket]:
    """Group tensors, in order, into buckets of at most `bucket_bytes` each.

    Takes specs rather than tensors so that a trainer which gathers sharded weights lazily can
    plan before it materialises anything. A tensor larger than `bucket_bytes` gets a bucket of
    its own (the sender then broadcasts it in place, without a copy). A tensor that would start
    at a byte offset its dtype's size does not divide (after an odd-sized int8 or bool tensor,
    say) starts a new bucket instead: SGLang's `FlattenedTensorBucket.empty` refuses such a
    bucket, and the order must stay the sender's, so neither padding nor reordering will do.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    buckets: list[Bucket] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        misaligned = size % spec.torch_dtype.itemsize != 0
        if current and (misaligned or size + spec.nbytes > bucket_bytes):
            buckets.append(Bucket(tuple(current), size))
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        buckets.append(Bucket(tuple(current), size))
    return buckets


def plan_specs(plan: Iterable[Bucket]) -> list[TensorSpec]:
    """All specs of a plan, in transfer order."""
    return [spec for bucket in plan for spec in bucket.specs]


def plan_fingerprint(plan: Iterable[Bucket], version: int) -> int:
    """A 62-bit digest of the plan (names, dtypes, shapes, bucket borders) and the version.

    Every member of a transfer contributes it to the handshake, so a sender and a receiver that
    were handed different plans fail at once instead of exchanging misaligned buckets.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(f"v{version}".encode())
    for bucket in plan:
        h.update(b"|bucket")
        for spec in bucket.specs:
            h.update(f"|{spec.name}:{spec.dtype}:{spec.shape}".encode())
    return int.from_bytes(h.digest(), "little") >> 2


def check_manifest(
    expected: Mapping[str, TensorSpec] | Iterable[TensorSpec],
    incoming: Iterable[TensorSpec],
) -> None:
    """Raise `WeightSyncError` unless `incoming` has exactly the receiver's tensors.

    `expected` is what the receiver holds (a list of specs or a dict by name); `incoming` is
    what the sender will send. The error lists missing, unexpected, duplicated and mismatched
    names (with both dtypes and shapes), a few examples of each plus counts.
    """
    mine = dict(expected) if isinstance(expected, Mapping) else {s.name: s for s in expected}
    incoming = list(incoming)
    theirs = {s.name: s for s in incoming}
    problems = _manifest_problems(mine, theirs, _duplicates(incoming))
    if problems:
        counts = ", ".join(f"{len(items)} {kind}" for kind, items in problems)
        lines = [f"weight manifest does not match the receiving model: {counts}"]
        lines += [f"  {kind}: {name_list(items)}" for kind, items in problems]
        raise WeightSyncError("\n".join(lines))


def _manifest_problems(
    mine: dict[str, TensorSpec], theirs: dict[str, TensorSpec], duplicated: list[str]
) -> list[tuple[str, list[str]]]:
    missing = [n for n in mine if n not in theirs]
    unexpected = [n for n in theirs if n not in mine]
    mismatched = [
        f"{n} (sent {theirs[n].describe()}, receiver has {mine[n].describe()})"
        for n in mine
        if n in theirs and (theirs[n].dtype, theirs[n].shape) != (mine[n].dtype, mine[n].shape)
    ]
    sections = [
        ("missing (receiver has, not sent)", missing),
        ("unexpected (sent, receiver lacks)", unexpected),
        ("mismatched", mismatched),
        ("duplicated (sent more than once)", duplicated),
    ]
    return [(kind, items) for kind, items in sections if items]


def _duplicates(specs: list[TensorSpec]) -> list[str]:
    counts = Counter(s.name for s in specs)
    return [name for name, count in counts.items() if count > 1]
