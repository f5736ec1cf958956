"""Weight streams with runs (`weights.runs.TensorRun`): packed as the same bytes as pairs.

The Megatron backend hands each MoE layer's experts to the sync as two runs (see
tests/test_megatron.py for its export); here the packer is held to the per-tensor path on
hand-made streams whose runs cross bucket edges, fill a bucket alone (sent in place), and
carry a wrong name or shape.
"""

import pytest
import torch

from weights.errors import WeightSyncError
from weights.manifest import TensorSpec, manifest_of, plan_buckets
from weights.runs import TensorRun, pairs
from weights.sync import packed_buckets

CPU = torch.device("cpu")


def stream_with_runs() -> list:
    """A pair, a run of 12 [4, 8] tensors, a pair, a run of 5 [8, 4] tensors, a pair."""
    g = torch.Generator().manual_seed(0)
    return [
        ("embed", torch.randn(16, 8, generator=g)),
        TensorRun(tuple(f"gate_up.{i}" for i in range(12)), torch.randn(12, 4, 8, generator=g)),
        ("norm", torch.randn(8, generator=g)),
        TensorRun(tuple(f"down.{i}" for i in range(5)), torch.randn(5, 8, 4, generator=g)),
        ("head", torch.randn(3, 8, generator=g)),
    ]


def packed(plan, stream) -> list[bytes]:
    return [bytes(buffer.numpy()) for buffer in packed_buckets(plan, stream, CPU)]


@pytest.mark.parametrize("bucket_bytes", [128, 384, 1000, 1 << 20])
def test_runs_pack_to_the_bytes_of_their_tensors_one_by_one(bucket_bytes):
    stream = stream_with_runs()
    plan = plan_buckets(manifest_of(pairs(stream)), bucket_bytes)
    assert packed(plan, stream) == packed(plan, list(pairs(stream)))
    assert len(plan) > 1 or bucket_bytes == 1 << 20


def test_a_bucket_that_is_one_run_slice_is_sent_in_place():
    run = TensorRun(("a", "b", "c", "d"), torch.randn(4, 16, 4))
    plan = plan_buckets(manifest_of(run.pairs()), 2 * 16 * 4 * 4)  # two tensors a bucket
    buffers = list(packed_buckets(plan, [run], CPU))
    assert len(buffers) == 2
    assert buffers[1].data_ptr() == run.stacked[2].data_ptr()  # no copy


def test_a_wrong_name_inside_a_run_is_named():
    stream = stream_with_runs()
    plan = plan_buckets(manifest_of(pairs(stream)), 1000)
    names = list(stream[1].names)
    names[7] = "gate_up.seven"
    stream[1] = TensorRun(tuple(names), stream[1].stacked)
    with pytest.raises(WeightSyncError, match=r"'gate_up\.seven'.*plan's 'gate_up\.7'"):
        packed(plan, stream)


def test_a_run_of_the_wrong_shape_is_refused():
    stream = stream_with_runs()
    specs = manifest_of(pairs(stream))
    specs = [
        TensorSpec(s.name, s.dtype, (8, 4)) if s.name.startswith("gate_up") else s for s in specs
    ]
    with pytest.raises(WeightSyncError, match=r"gate_up\.0"):
        packed(plan_buckets(specs, 1000), stream)


def test_a_stream_longer_or_shorter_than_its_plan_is_refused():
    stream = stream_with_runs()
    plan = plan_buckets(manifest_of(pairs(stream)), 1000)
    with pytest.raises(WeightSyncError, match="more tensors than its plan"):
        packed(plan, [*stream, ("extra", torch.zeros(2))])
    with pytest.raises(WeightSyncError, match="ran out before 'head'"):
        packed(plan, stream[:-1])


def test_a_run_needs_one_row_per_name():
    with pytest.raises(ValueError, match="a run of 3 names"):
        TensorRun(("a", "b", "c"), torch.zeros(2, 4))
