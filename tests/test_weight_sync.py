"""Weight sync: bucket plans and manifest checks, then real broadcasts between Ray actors (gloo).

The actors below stand in for the real TrainActor and RolloutActor: they hold a tiny Qwen3-MoE
built with different seeds and call the `weights` API exactly as those actors will.
"""

import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import torch
import transformers

from models.tiny import build_tiny_model
from weights.checksum import compare_checksums, tensor_checksums
from weights.errors import WeightSyncError
from weights.manifest import Bucket, TensorSpec, check_manifest, manifest_of, plan_buckets
from weights.process_group import GroupInfo, init_weights_update_group, pick_master_address_and_port
from weights.sync import SyncStats, WeightReceiver, WeightSender

TESTS = Path(__file__).resolve().parent
BUCKET_BYTES = 64 * 1024
"""Small enough that the tiny model (about 530 KB) needs many buckets, some of one tensor."""

TIMEOUT_S = 20.0

WORKER_PYTHONPATH = os.pathsep.join(
    [str(TESTS), str(TESTS.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
)
"""Workers import this module (the actors' classes), the repository's packages, and whatever
the driver's PYTHONPATH holds (on the GPU machine: Ray itself)."""


def tiny_model(seed: int) -> transformers.PreTrainedModel:
    """The built-in tiny Qwen3-MoE (hidden 64, 2 layers, 8 experts top-2), random init."""
    return build_tiny_model(seed)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@ray.remote(num_cpus=1)
class Trainer:
    """Rank 0: owns the full weights, hosts the group, sends."""

    def __init__(self, seed: int):
        self.model = tiny_model(seed)

    def open_group(self, world_size: int) -> GroupInfo:
        address, port = pick_master_address_and_port()
        self.info = GroupInfo(address, port, world_size, backend="gloo", timeout_s=TIMEOUT_S)
        return self.info

    def join(self) -> None:
        self.sender = WeightSender(init_weights_update_group(self.info, rank=0))

    def plan(self, bucket_bytes: int) -> list[Bucket]:
        self._plan = plan_buckets(manifest_of(self.model.named_parameters()), bucket_bytes)
        return self._plan

    def step(self) -> None:
        """Stands in for an optimizer step: every weight changes."""
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn_like(p))

    def send(self, version: int) -> SyncStats:
        return self.sender.send(self._plan, self.model.named_parameters(), version)

    def weights(self) -> dict[str, torch.Tensor]:
        return snapshot(self.model)

    def checksums(self) -> dict[str, str]:
        return tensor_checksums(self.model.named_parameters())


@ray.remote(num_cpus=1)
class Engine:
    """An engine worker: same architecture, its own random init, receives."""

    def __init__(self, seed: int):
        self.model = tiny_model(seed)

    def join(self, info: GroupInfo, rank_offset: int) -> None:
        group = init_weights_update_group(info, rank=rank_offset)
        self.receiver = WeightReceiver(group, dict(self.model.named_parameters()))

    def check(self, plan: list[Bucket]) -> None:
        self.receiver.check(plan)

    def receive(self, plan: list[Bucket], version: int) -> SyncStats:
        return self.receiver.receive(plan, version)

    def version(self) -> int | None:
        return self.receiver.version

    def weights(self) -> dict[str, torch.Tensor]:
        return snapshot(self.model)

    def checksums(self) -> dict[str, str]:
        return tensor_checksums(self.model.named_parameters())


# ---- units ------------------------------------------------------------------------------


def specs(*sizes: int) -> list[TensorSpec]:
    return [TensorSpec(f"t{i}", "float32", (n,)) for i, n in enumerate(sizes)]


def test_plan_buckets_keeps_order_and_bounds_size():
    plan = plan_buckets(specs(10, 10, 10, 5, 20), bucket_bytes=100)  # 40, 40, 40, 20, 80 bytes
    assert [b.names for b in plan] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert [b.nbytes for b in plan] == [80, 60, 80]
    assert all(b.nbytes <= 100 for b in plan)


def test_plan_buckets_gives_a_large_tensor_its_own_bucket():
    plan = plan_buckets(specs(5, 100, 5, 5), bucket_bytes=64)
    assert [b.names for b in plan] == [["t0"], ["t1"], ["t2", "t3"]]
    assert plan[1].nbytes == 400
    assert plan[1].slices() == [(plan[1].specs[0], 0, 400)]


def test_plan_buckets_mixed_dtypes_and_sglang_fields():
    mixed = [
        TensorSpec("a", "bfloat16", (3, 2)),
        TensorSpec("b", "float32", ()),
        TensorSpec("c", "int64", (2,)),
    ]
    (bucket,) = plan_buckets(mixed, bucket_bytes=1024)
    assert bucket.nbytes == 12 + 4 + 16
    assert [(b, e) for _, b, e in bucket.slices()] == [(0, 12), (12, 16), (16, 32)]
    assert bucket.dtypes == ["bfloat16", "float32", "int64"]
    assert bucket.shapes == [[3, 2], [], [2]]
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(mixed, 0)


def test_plan_buckets_starts_every_tensor_at_an_offset_aligned_to_its_dtype():
    """SGLang's `FlattenedTensorBucket.empty` refuses a tensor at an offset its itemsize does
    not divide; the planner closes the bucket there instead, keeping the order."""
    mixed = [
        TensorSpec("flags", "bool", (3,)),  # 3 bytes: the next float32 would sit at offset 3
        TensorSpec("w", "float32", (2,)),
        TensorSpec("b", "bfloat16", (1,)),  # offset 8
        TensorSpec("q", "int8", (5,)),  # offset 10: int8 fits anywhere
        TensorSpec("x", "int64", (1,)),  # offset 15: misaligned, a new bucket
        TensorSpec("y", "int8", (1,)),
    ]
    plan = plan_buckets(mixed, bucket_bytes=1024)
    assert [b.names for b in plan] == [["flags"], ["w", "b", "q"], ["x", "y"]]
    assert [s.name for b in plan for s in b.specs] == [s.name for s in mixed]
    for bucket in plan:
        for spec, start, _ in bucket.slices():
            assert start % spec.torch_dtype.itemsize == 0, (spec, start)
    aligned = [TensorSpec("a", "bfloat16", (3,)), TensorSpec("b", "bfloat16", (1,))]
    assert len(plan_buckets(aligned, bucket_bytes=1024)) == 1  # 2-byte offsets suit bf16


def test_check_manifest_accepts_an_exact_match():
    check_manifest(specs(1, 2, 3), list(reversed(specs(1, 2, 3))))
    check_manifest({s.name: s for s in specs(4)}, specs(4))


def test_check_manifest_names_missing_unexpected_and_mismatched():
    mine = [*specs(4, 8), TensorSpec("w", "float32", (4, 8))]
    sent = [TensorSpec("t0", "float32", (4,)), TensorSpec("extra", "float32", (1,))]
    sent.append(TensorSpec("w", "bfloat16", (8, 4)))
    with pytest.raises(WeightSyncError) as err:
        check_manifest(mine, sent)
    message = str(err.value)
    assert "1 missing" in message and "t1" in message
    assert "1 unexpected" in message and "extra" in message
    assert "w (sent bfloat16[8, 4], receiver has float32[4, 8])" in message


def test_check_manifest_caps_long_lists():
    with pytest.raises(WeightSyncError) as err:
        check_manifest(specs(*[1] * 50), [])
    message = str(err.value)
    assert "50 missing" in message and "... and 45 more" in message
    assert "t5," not in message


def test_check_manifest_rejects_duplicates():
    with pytest.raises(WeightSyncError, match=r"duplicated.*t0"):
        check_manifest(specs(1), specs(1) + specs(1))


def test_checksums_are_bit_exact():
    torch.manual_seed(0)
    tensors = {
        "w": torch.randn(33, 7),
        "odd_bf16": torch.randn(5).bfloat16(),  # 10 bytes: a trailing half word
        "flag": torch.tensor([True, False, True]),
        "strided": torch.randn(6, 4).t(),
    }
    same = {name: t.clone() for name, t in tensors.items()}
    assert tensor_checksums(tensors.items()) == tensor_checksums(same.items())
    flipped = {**same, "w": same["w"].clone()}
    flipped["w"].view(torch.int32)[17, 3] ^= 1  # one bit of one float
    moved = {**same, "odd_bf16": same["odd_bf16"].flip(0)}
    compare_checksums(tensor_checksums(tensors.items()), tensor_checksums(same.items()))
    for other, name in ((flipped, "w"), (moved, "odd_bf16")):
        with pytest.raises(WeightSyncError, match=f"1 differ: {name}"):
            compare_checksums(tensor_checksums(tensors.items()), tensor_checksums(other.items()))
    without_flag = {name: t for name, t in same.items() if name != "flag"}
    with pytest.raises(WeightSyncError, match="1 missing: flag"):
        compare_checksums(tensor_checksums(tensors.items()), tensor_checksums(without_flag.items()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_checksums_same_on_cpu_and_cuda():
    torch.manual_seed(0)
    tensors = {"big": torch.randn(3_000_001), "bf16": torch.randn(7, 3).bfloat16()}
    on_gpu = {name: t.cuda() for name, t in tensors.items()}
    assert tensor_checksums(tensors.items()) == tensor_checksums(on_gpu.items())


def test_a_peer_that_never_joins_fails_with_the_group_named():
    address, port = pick_master_address_and_port()
    info = GroupInfo(address, port, world_size=3, group_name="lonely", timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(WeightSyncError) as err:
        init_weights_update_group(info, rank=0)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "'lonely'" in message and f"{address}:{port}" in message
    assert "world size 3" in message and "[1, 2] did not join" in message


# ---- real processes -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[SimpleNamespace]:
    """A local Ray, one trainer and two engines joined in one gloo weight group."""
    ray.init(
        address="local",  # never join another local cluster that happens to be running
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": WORKER_PYTHONPATH}},
    )
    try:
        trainer = Trainer.remote(seed=1)
        engines = [Engine.remote(seed=2 + i) for i in range(2)]
        info = ray.get(trainer.open_group.remote(world_size=1 + len(engines)))
        joins = [e.join.remote(info, rank_offset=1 + i) for i, e in enumerate(engines)]
        ray.get([trainer.join.remote(), *joins])
        plan = ray.get(trainer.plan.remote(BUCKET_BYTES))
        yield SimpleNamespace(trainer=trainer, engines=engines, plan=plan)
    finally:
        ray.shutdown()


def sync(c: SimpleNamespace, version: int, plans: list[list[Bucket]] | None = None) -> list:
    """Start the sender and every receiver concurrently; return their results or errors."""
    plans = plans or [c.plan] * len(c.engines)
    refs = [c.trainer.send.remote(version)]
    refs += [e.receive.remote(p, version) for e, p in zip(c.engines, plans, strict=True)]
    return [_result(ref) for ref in refs]


def _result(ref: ray.ObjectRef) -> object:
    try:
        return ray.get(ref, timeout=TIMEOUT_S * 2)
    except WeightSyncError as e:  # Ray re-raises it as a subclass of WeightSyncError
        return e


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    unequal = [name for name in a if not torch.equal(a[name], b[name])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}"


def with_spec(plan: list[Bucket], target: str, **change: object) -> list[Bucket]:
    """The plan with one tensor's spec changed (and the buckets re-planned)."""
    specs_ = [replace(s, **change) if s.name == target else s for b in plan for s in b.specs]
    return plan_buckets(specs_, BUCKET_BYTES)


EXPERTS = "model.layers.1.mlp.experts.down_proj"


def test_the_plan_spans_several_buckets(cluster):
    assert len(cluster.plan) >= 5
    assert any(len(b.specs) > 1 for b in cluster.plan)
    assert any(b.nbytes > BUCKET_BYTES for b in cluster.plan)  # the expert tensors


def test_wrong_shape_is_rejected_by_the_check(cluster):
    bad = with_spec(cluster.plan, EXPERTS, shape=(8, 32, 64))
    before = ray.get(cluster.engines[0].weights.remote())
    with pytest.raises(WeightSyncError) as err:
        ray.get(cluster.engines[0].check.remote(bad))
    shapes = "sent float32[8, 32, 64], receiver has float32[8, 64, 64]"
    assert f"{EXPERTS} ({shapes})" in str(err.value)
    assert_same(ray.get(cluster.engines[0].weights.remote()), before)


def test_renamed_tensor_is_rejected_by_the_check(cluster):
    bad = with_spec(cluster.plan, "lm_head.weight", name="lm_head.weights")
    with pytest.raises(WeightSyncError) as err:
        ray.get(cluster.engines[1].check.remote(bad))
    assert "missing (receiver has, not sent): lm_head.weight" in str(err.value)
    assert "unexpected (sent, receiver lacks): lm_head.weights" in str(err.value)


def test_a_rejected_manifest_stops_every_member_before_any_data(cluster):
    """Skipping the check still gives errors on all ranks, not a hang, and no engine changes."""
    before = ray.get([e.weights.remote() for e in cluster.engines])
    bad = with_spec(cluster.plan, EXPERTS, shape=(8, 32, 64))
    sent, first, second = sync(cluster, version=5, plans=[bad, cluster.plan])
    assert isinstance(first, WeightSyncError) and EXPERTS in str(first)
    for err in (sent, second):
        assert isinstance(err, WeightSyncError) and "rank(s) [1] rejected" in str(err)
    for engine, old in zip(cluster.engines, before, strict=True):
        assert_same(ray.get(engine.weights.remote()), old)
        assert ray.get(engine.version.remote()) is None


def test_sync_makes_every_engine_bit_identical(cluster):
    ray.get([e.check.remote(cluster.plan) for e in cluster.engines])
    for version in (1, 2):
        ray.get(cluster.trainer.step.remote())
        sent, *received = sync(cluster, version)
        assert isinstance(sent, SyncStats), sent
        assert sent.buckets == len(cluster.plan)
        assert (
            sent.nbytes == sum(b.nbytes for b in cluster.plan) == 4 * tiny_model(0).num_parameters()
        )
        assert all(isinstance(r, SyncStats) and r.version == version for r in received)
        expected = ray.get(cluster.trainer.weights.remote())
        for engine in cluster.engines:
            assert_same(ray.get(engine.weights.remote()), expected)
            assert ray.get(engine.version.remote()) == version
    checksums = ray.get(cluster.trainer.checksums.remote())
    for engine in cluster.engines:
        compare_checksums(checksums, ray.get(engine.checksums.remote()), where="engine")
