"""Weights handed to colocated engines as CUDA IPC handles (SGLang's `/update_weights_from_tensor`).

A colocated engine shares the trainers' GPUs, so no byte needs to travel between GPUs: the
training rank on each engine rank's GPU packs each bucket into one buffer there (the same flat
layout as a broadcast bucket) and sends a handle to it; each SGLang rank opens the handle of
its own GPU (entry `tp_rank` of the request) and copies the weights into its shards. Every
training rank holds the full gathered bucket during an export, so any of them can pack it;
packing on the reader's GPU keeps every copy on one GPU and every CUDA context where it
belongs (and works across nodes, which CUDA IPC does not cross).

What waits for what (the driver, `actors/weight_sync.py`): every training rank takes part in
each bucket's export (the weights are gathered collectively), the serving ranks return the
serialized handles, the driver posts them to every engine and waits for all of them before
asking for the next bucket, so a bucket's buffer may be reused once the next one is asked for.

The payload is what sglang 0.5.23 decodes for `load_format="flattened_bucket"`: a pickled
`{"flattened_tensor": buffer, "metadata": [...]}`, each metadata entry with `name`, `shape`,
`dtype`, `start_idx`, `end_idx`, `numel` (a `SimpleNamespace`, which SGLang's restricted
unpickler admits), base64 text since the request travels as JSON. A CUDA tensor's device is
written as its GPU's UUID, which SGLang maps back to its own device index (its processes see
the node's GPUs in another numbering than the trainer's).
"""

import base64
import io
import pickle
from collections.abc import Iterable
from multiprocessing.reduction import ForkingPickler
from types import SimpleNamespace

import torch
from torch.multiprocessing import reductions

from weights.errors import WeightSyncError
from weights.manifest import Bucket
from weights.runs import StreamItem
from weights.sync import _pack, _Staging, _StreamReader

_DEVICE_ARG = 6
"""Position of the device index among `reduce_tensor`'s arguments for a CUDA tensor."""


class _HandlePickler(ForkingPickler):
    """torch's sharing reductions, with a CUDA tensor's device index replaced by its UUID."""

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            rebuild, args = reductions.reduce_tensor(obj)
            uuid = str(torch.cuda.get_device_properties(args[_DEVICE_ARG]).uuid)
            return rebuild, (*args[:_DEVICE_ARG], uuid, *args[_DEVICE_ARG + 1 :])
        return NotImplemented


def serialize_bucket(buffer: torch.Tensor, bucket: Bucket) -> str:
    """The base64 text SGLang's `MultiprocessingSerializer.deserialize` turns back into the
    bucket (the buffer itself is shared, not copied)."""
    metadata = [
        SimpleNamespace(
            name=spec.name,
            shape=torch.Size(spec.shape),
            dtype=spec.torch_dtype,
            start_idx=start,
            end_idx=end,
            numel=end - start,
        )
        for spec, start, end in bucket.slices()
    ]
    out = io.BytesIO()
    _HandlePickler(out).dump({"flattened_tensor": buffer, "metadata": metadata})
    return base64.b64encode(out.getvalue()).decode("ascii")


def open_bucket(text: str) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a bucket that `serialize_bucket` wrote, as views of the sender's buffer
    (opened in place through CUDA IPC: nothing is copied). For the in-process transformers
    engine; SGLang decodes the same text with its own deserializer.

    The views are valid while the sender keeps the buffer: copy them out before answering."""
    payload = _UuidUnpickler(io.BytesIO(base64.b64decode(text))).load()
    flat = payload["flattened_tensor"]
    return [
        (m.name, flat[m.start_idx : m.end_idx].view(m.dtype).reshape(m.shape))
        for m in payload["metadata"]
    ]


class _UuidUnpickler(pickle.Unpickler):
    """Opens CUDA tensor handles whose device is a GPU UUID (see `_HandlePickler`) on the
    device of that UUID in this process's numbering."""

    def find_class(self, module, name):
        found = super().find_class(module, name)
        if (module, name) != ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
            return found

        def rebuild(*args):
            device = args[_DEVICE_ARG]
            if isinstance(device, str):
                device = _device_of_uuid(device)
            return found(*args[:_DEVICE_ARG], device, *args[_DEVICE_ARG + 1 :])

        return rebuild


def _device_of_uuid(uuid: str) -> int:
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == uuid:
            return index
    raise WeightSyncError(
        f"a CUDA IPC handle points at GPU {uuid}, which this process does not see: the engine "
        f"must share a GPU with the training rank that serves its handles"
    )


class IpcExport:
    """One sync's export on one training rank; a `serving` rank serializes the buckets."""

    def __init__(self, stream: Iterable[StreamItem], serving: bool, device: torch.device):
        """`stream`: (name, tensor) pairs and `TensorRun`s in plan order."""
        self._reader = _StreamReader(stream)
        self._serving = serving
        self._device = device
        self._staging = _Staging(device)
        self._current: torch.Tensor | None = None  # the buffer the engines may still read

    def bucket(self, bucket: Bucket) -> str | None:
        """Take part in gathering `bucket`; on a serving rank, the handle text (None for an
        empty bucket, and on every other rank)."""
        with torch.no_grad():
            tensors = self._reader.take(bucket.specs)
            if not self._serving or bucket.nbytes == 0:
                return None
            self._current = _pack(bucket, tensors, self._staging, self._device)
            if self._device.type == "cuda":
                torch.cuda.current_stream(self._device).synchronize()  # engines read it next
            return serialize_bucket(self._current, bucket)

    def finish(self) -> None:
        """Check every tensor was exported and release the buffers."""
        if not self._reader.exhausted():
            raise WeightSyncError("the trainer holds more tensors than the weight plan")
        self._current = None
        self._staging = _Staging(self._device)
