"""CUDA IPC handles from `weights.ipc`, opened by another process on the GPU (colocated engines).

The receiving process decodes the payload the way sglang 0.5.23 does (SGLang itself cannot be
installed on the GPU machine): torch's `rebuild_cuda_tensor` with the device written as a GPU
UUID mapped back to a local index (sglang's `monkey_patch_torch_reductions`), then views by the
bucket's byte ranges (sglang's `FlattenedTensorBucket`). On the CPU, `test_sglang_engine.py`
shows sglang's own deserializer decoding the same payloads.
"""

import base64
import hashlib
import io
import pickle

import pytest
import torch
import torch.multiprocessing as mp

from weights.ipc import IpcExport
from weights.manifest import manifest_of, plan_buckets

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.sglang,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _device_of_uuid(uuid: str) -> int:
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == uuid:
            return index
    raise ValueError(f"no visible GPU has UUID {uuid}")


class _UuidUnpickler(pickle.Unpickler):
    """Maps the device UUID of a CUDA tensor handle to this process's device index."""

    def find_class(self, module, name):
        found = super().find_class(module, name)
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):

            def rebuild(*args):
                device = args[6]
                index = _device_of_uuid(device) if isinstance(device, str) else device
                return found(*args[:6], index, *args[7:])

            return rebuild
        return found


def _receive(requests, results) -> None:
    """One bucket's handle at a time, answered before the next arrives (as engines do)."""
    while (text := requests.get()) is not None:
        payload = _UuidUnpickler(io.BytesIO(base64.b64decode(text))).load()
        flat = payload["flattened_tensor"]
        hashes = {}
        for meta in payload["metadata"]:
            view = flat[meta.start_idx : meta.end_idx].view(meta.dtype).reshape(meta.shape)
            hashes[meta.name] = _sha256(view)
        results.put(hashes)


def _sha256(tensor: torch.Tensor) -> str:
    data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def test_handles_open_in_another_process_with_the_bytes_sent():
    device = torch.device("cuda", 0)
    generator = torch.Generator(device=device).manual_seed(0)
    shapes = [(7, torch.bfloat16), (300, torch.float32), (5, torch.bfloat16), (1, torch.float32)]
    weights = [
        (f"w{i}", torch.randn(n, 129, device=device, generator=generator).to(dtype))
        for i, (n, dtype) in enumerate(shapes)
    ]
    plan = plan_buckets(manifest_of(weights), bucket_bytes=64 << 10)
    export = IpcExport(iter(weights), serving=True, device=device)
    context = mp.get_context("spawn")
    requests, results = context.Queue(), context.Queue()
    receiver = context.Process(target=_receive, args=(requests, results))
    receiver.start()
    received, buckets = {}, 0
    for bucket in plan:  # the staging buffer is reused once the receiver has answered
        text = export.bucket(bucket)
        if text is not None:
            requests.put(text)
            received |= results.get(timeout=300)
            buckets += 1
    requests.put(None)
    receiver.join(timeout=60)
    export.finish()
    assert buckets > 1
    assert received == {name: _sha256(t) for name, t in weights}
    print(f"{buckets} buckets opened by CUDA IPC on {torch.cuda.get_device_name(0)}")
