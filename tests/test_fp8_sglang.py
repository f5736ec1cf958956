"""An fp8 sync to SGLang, against sglang 0.5.23's own request classes and weight code.

The engine side is what the other `sglang` tests use: the request bodies go through the
server's pydantic validation (`io_struct`), the flattened buckets through SGLang's
`FlattenedTensorBucket`, and the broadcast into SGLang's own `WeightUpdater`, inside the
recording HTTP double of the server's control routes (`tests/sglang_receiver.py`; not SGLang:
no model, no generation). The checkpoint is an FP8 one written by tools/convert_hf_to_fp8.py.
"""

import json
import threading
import warnings
from pathlib import Path

import pytest
import requests
import torch

from inference.sglang import requests as bodies
from models.checkpoint_format import checkpoint_tensors
from models.fp8_checkpoint import read_fp8_format
from models.tiny import build_tiny_model, save_tiny_model
from tests.test_sglang_engine import RECEIVER, free_port, join_group, make_engine, sha256
from tests.test_sglang_requests import validate
from tools import convert_hf_to_fp8
from weights.errors import WeightSyncError
from weights.fp8_export import Fp8Export
from weights.manifest import manifest_of, plan_buckets
from weights.sync import _pack, _Staging

pytestmark = pytest.mark.sglang

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from sglang.srt.managers import io_struct
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

BUCKET_BYTES = 16 << 10
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sglang_fp8")
    save_tiny_model(root / "tiny", 0)
    argv = ["--hf-checkpoint", str(root / "tiny"), "--save", str(root / "tiny-FP8")]
    assert convert_hf_to_fp8.run(argv) == 0
    return root / "tiny-FP8"


def fp8_weights(fp8_dir: Path, scale: float) -> tuple[list[tuple[str, torch.Tensor]], list]:
    """The trainer's weights as the sync sends them, and their bucket plan."""
    export = Fp8Export(read_fp8_format(fp8_dir))
    trained = [(n, t * scale) for n, t in checkpoint_tensors(build_tiny_model(seed=0))]
    plan = plan_buckets(export.specs(manifest_of(trained)), BUCKET_BYTES)
    return list(export.tensors(trained)), plan


def test_fp8_request_bodies_build_sglangs_request_classes(fp8_dir):
    weights, plan = fp8_weights(fp8_dir, 1.0)
    tensors = dict(weights)
    staging = _Staging(CPU)
    for bucket in plan:
        body = bodies.update_weights_from_distributed_body(
            bucket, "g", flush_cache=False, weight_version=None
        )
        request = validate(io_struct.UpdateWeightsFromDistributedReqInput, body)
        assert (request.names, request.dtypes, request.shapes) == (
            bucket.names,
            bucket.dtypes,
            bucket.shapes,
        )
        # SGLang's receive buffer for this body, filled with our packed bytes, gives our
        # tensors back: same layout, fp8 included.
        received = FlattenedTensorBucket.empty(request.names, request.dtypes, request.shapes, CPU)
        packed = _pack(bucket, [tensors[n] for n in bucket.names], staging, CPU)
        received.get_flattened_tensor().copy_(packed)
        for name, tensor in received.reconstruct_tensors():
            assert tensor.dtype == tensors[name].dtype and tensor.shape == tensors[name].shape
            assert torch.equal(tensor.view(torch.uint8), tensors[name].view(torch.uint8))
    dtypes = {d for b in plan for d in b.dtypes}
    names = [n for b in plan for n in b.names]
    assert dtypes == {"float8_e4m3fn", "float32"}
    assert "model.layers.0.mlp.experts.3.down_proj.weight_scale_inv" in names
    assert json.loads(json.dumps(plan[0].dtypes))  # plain JSON, as the HTTP client sends it


def test_an_fp8_sync_reaches_sglangs_weight_updater_bit_for_bit(fp8_dir, tmp_path):
    engine = make_engine(fp8_dir, tmp_path, RECEIVER)
    try:
        sender = join_group(engine, free_port())
        weights, plan = fp8_weights(fp8_dir, 1.5)
        engine.check_weights_update(plan)  # the FP8 checkpoint's names, shapes and fp8-ness
        sent = threading.Thread(target=sender.send, args=(plan, iter(weights), 3))
        sent.start()
        stats = engine.update_weights_from_distributed(plan, version=3)
        sent.join()
        assert engine.weight_version == 3 and stats.nbytes == sum(b.nbytes for b in plan)
        received = requests.get(f"{engine.url}/_received", timeout=10).json()
        assert received == {name: sha256(t) for name, t in weights}
        calls = requests.get(f"{engine.url}/_recorded", timeout=10).json()
        updates = [c["body"] for c in calls if c["path"] == "/update_weights_from_distributed"]
        sent_dtypes = {n: d for u in updates for n, d in zip(u["names"], u["dtypes"], strict=True)}
        assert sent_dtypes["model.layers.1.self_attn.o_proj.weight"] == "float8_e4m3fn"
        assert sent_dtypes["model.layers.1.self_attn.o_proj.weight_scale_inv"] == "float32"
        assert sent_dtypes["model.layers.1.mlp.gate.weight"] == "float32"
    finally:
        engine.shutdown()


def test_a_bf16_plan_is_refused_by_an_fp8_engine_before_the_session(fp8_dir, tmp_path):
    engine = make_engine(fp8_dir, tmp_path, RECEIVER)
    try:
        trained = list(checkpoint_tensors(build_tiny_model(seed=0)))
        scales = [(n + "_scale_inv", torch.ones(1, 1)) for n, _ in trained if "proj" in n]
        plan = plan_buckets(manifest_of(trained + scales), BUCKET_BYTES)
        with pytest.raises(WeightSyncError, match=r"is sent as float32, stored as F8_E4M3"):
            engine.check_weights_update(plan)
        assert requests.get(f"{engine.url}/_recorded", timeout=10).json() == []
    finally:
        engine.shutdown()
