"""Hugging Face model directories of safetensors: read tensors lazily, write them in shards.

The layout is the one transformers writes and reads: a single `model.safetensors`, or shards
`model-0000k-of-0000N.safetensors` plus `model.safetensors.index.json`, whose `weight_map`
names the shard of every tensor. Reading opens each shard memory-mapped and copies out one
tensor at a time; writing streams tensors into shards and never holds more than one shard.

A written directory appears complete or not at all: it is built in a `.tmp` sibling and
renamed into place, and an existing directory of that name is replaced only afterwards.
"""

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from config.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsReader:
    """The tensors of one model directory, read by name on demand."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._file_of = _weight_map(self.directory)
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self._file_of)

    def read(self, name: str) -> torch.Tensor:
        """The full tensor `name` (a CPU copy, in the dtype it was stored in)."""
        file = self._file_of.get(name)
        if file is None:
            raise UserError(
                f"{self.directory} has no tensor {name!r}: its weights do not match the model "
                f"its config.json describes"
            )
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.directory / file), framework="pt")
        return self._handles[file].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The stored shape of `name` from its file's header (no data read); None if absent."""
        header = self._header(name)
        return None if header is None else tuple(header.get_shape())

    def dtype(self, name: str) -> str | None:
        """The stored dtype of `name` as safetensors spells it (`BF16`, `F8_E4M3`, `F32`), from
        its file's header; None if absent."""
        header = self._header(name)
        return None if header is None else header.get_dtype()

    def _header(self, name: str):
        file = self._file_of.get(name)
        if file is None:
            return None
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.directory / file), framework="pt")
        return self._handles[file].get_slice(name)


def _weight_map(directory: Path) -> dict[str, str]:
    """Tensor name -> file name, from the index or the single file's header."""
    index = directory / INDEX_FILE
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = directory / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), SINGLE_FILE)
    raise UserError(
        f"{directory} holds no safetensors weights (neither {SINGLE_FILE} nor {INDEX_FILE}); "
        f"point it at a Hugging Face model directory"
    )


def write_sharded(
    directory: str | Path,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    max_shard_bytes: int = 4 << 30,
    extra_files: Iterable[str | Path] = (),
) -> None:
    """Write the tensors as a Hugging Face model directory, with `extra_files` copied in.

    Tensors are consumed one at a time, so a generator that gathers them (a collective
    export) is never run ahead. A tensor larger than `max_shard_bytes` gets a shard of its
    own. Everything lands in `<directory>.tmp` first; see `replace_directory`.
    """
    destination = Path(directory)
    staging = sibling(destination, ".tmp")
    _remove(staging)
    staging.mkdir(parents=True)
    shards = _write_shards(staging, named_tensors, max_shard_bytes)
    _name_shards(staging, shards)
    for file in extra_files:
        shutil.copy2(file, staging / Path(file).name)
    replace_directory(staging, destination)


def _write_shards(
    staging: Path, named_tensors: Iterable[tuple[str, torch.Tensor]], limit: int
) -> list[dict[str, int]]:
    """Save shards under provisional names; return each shard's tensor names and sizes."""
    shards: list[dict[str, int]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} given twice")
        seen.add(name)
        tensor = _standalone_cpu(tensor)
        if current and size + tensor.nbytes > limit:
            shards.append(_save_shard(staging, len(shards), current))
            current, size = {}, 0
        current[name] = tensor
        size += tensor.nbytes
    if current or not shards:
        shards.append(_save_shard(staging, len(shards), current))
    return shards


def _standalone_cpu(tensor: torch.Tensor) -> torch.Tensor:
    # safetensors refuses tensors that share storage (views into one flat buffer, as
    # megatron-core's DDP keeps parameters), so views get a compact copy of their own.
    tensor = tensor.detach().to("cpu")
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _save_shard(staging: Path, index: int, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    save_file(tensors, staging / f"shard-{index}.partial", metadata={"format": "pt"})
    return {name: t.nbytes for name, t in tensors.items()}


def _name_shards(staging: Path, shards: list[dict[str, int]]) -> None:
    """Final file names (they need the shard count) and, when sharded, the index."""
    if len(shards) == 1:
        (staging / "shard-0.partial").rename(staging / SINGLE_FILE)
        return
    weight_map = {}
    for k, sizes in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        (staging / f"shard-{k}.partial").rename(staging / file)
        weight_map.update(dict.fromkeys(sizes, file))
    total = sum(sum(sizes.values()) for sizes in shards)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def sibling(path: Path, suffix: str) -> Path:
    """`path` with `suffix` appended to its name: same parent, so a rename stays atomic."""
    return path.with_name(path.name + suffix)


def replace_directory(complete: Path, destination: Path) -> None:
    """Rename the finished directory `complete` to `destination`, replacing an old one.

    The old directory is renamed to `<destination>.old` before and deleted after, so at every
    instant a complete directory exists: a crash between the two renames leaves the new one
    at `complete` and the old one at `<destination>.old`, both whole.
    """
    old = None
    if destination.exists():
        old = sibling(destination, ".old")
        _remove(old)
        destination.rename(old)
    complete.rename(destination)
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
