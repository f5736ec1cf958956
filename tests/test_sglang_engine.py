"""`SglangEngine`, the code a RolloutActor runs, against processes it launches itself.

- The weight-update sequence runs against `tests/sglang_receiver.py`, a recording test double
  of an SGLang server's control routes (not SGLang: it cannot run here) that validates every
  body with sglang's own request classes and receives the broadcast with sglang's own
  `WeightUpdater`, while this test process is the trainer broadcasting over gloo.
  Colocated updates (CUDA IPC handles on GPUs) are decoded there by sglang's own serializer.
- Restarts run against `tests/stand_in_server.py`, a stand-in that only answers /health.
"""

import hashlib
import sys
import threading
from pathlib import Path

import pytest
import requests
import torch

import driver
from inference.engine import CACHE_MEMORY, WEIGHT_MEMORY
from inference.sglang.engine import EngineSite, SglangEngine, _runs
from inference.sglang.server import EngineFailure
from models.checkpoint_format import checkpoint_tensors
from models.tiny import build_tiny_model, save_tiny_model
from placement.planner import ClusterShape, NodeShape, plan_layout
from tests.sglang_receiver import WITHOUT_SESSIONS
from weights.errors import WeightSyncError
from weights.ipc import IpcExport
from weights.manifest import manifest_of, plan_buckets
from weights.process_group import GroupInfo, init_weights_update_group
from weights.sync import WeightSender

pytestmark = pytest.mark.sglang

RECEIVER = [sys.executable, "-W", "ignore", "-m", "tests.sglang_receiver"]
STAND_IN = [sys.executable, str(Path(__file__).with_name("stand_in_server.py"))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A Hugging Face directory of the tiny Qwen3-MoE: what the server would have loaded."""
    directory = tmp_path_factory.mktemp("model")
    save_tiny_model(directory, 0)
    return directory


def make_engine(
    model_dir: Path, tmp_path: Path, program: list[str], gpus_per_engine: int = 1
) -> SglangEngine:
    """Engine 0 of a plan on a node at 127.0.0.1 (where the test's server listens): one
    training GPU, then the engine's."""
    config, _ = driver.parse_args(
        ["--rollout.engine", "sglang", "--model.hf_checkpoint", str(model_dir),
         "--train.num_workers", "1", "--rollout.num_engines", "1", "--rollout.batch_size", "8",
         "--rollout.gpus_per_engine", str(gpus_per_engine),
         "--logging.output_dir", str(tmp_path), "--rollout.sglang.startup_timeout_s", "120"]
    )  # fmt: skip
    gpus = 1 + gpus_per_engine
    node = NodeShape(node_id="f" * 56, address="127.0.0.1", num_gpus=gpus, num_cpus=8.0)
    layout = plan_layout(ClusterShape((node,)), config)
    site = EngineSite(layout, gpu_ids=[list(range(1, gpus))], node_options=[{}])
    return SglangEngine(config, 0, site, program)


def trainer_weights(scale: float) -> list[tuple[str, torch.Tensor]]:
    """The tiny model's weights in the wire format, changed so a sync is visible."""
    model = build_tiny_model(seed=0)
    return [(name, (t * scale).contiguous()) for name, t in checkpoint_tensors(model)]


def sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def join_group(engine: SglangEngine, port: int) -> WeightSender:
    """Trainer (rank 0, here) and engine (rank 1) join at once, as the driver has them."""
    info = GroupInfo("127.0.0.1", port, world_size=2, backend="gloo", checked=False)
    joined = {}
    trainer = threading.Thread(
        target=lambda: joined.update(group=init_weights_update_group(info, rank=0))
    )
    trainer.start()
    engine.init_weights_update_group(info, rank_offset=1)
    trainer.join()
    return WeightSender(joined["group"])


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def test_weight_update_sequence_reaches_sglangs_receiver(model_dir, tmp_path):
    engine = make_engine(model_dir, tmp_path, RECEIVER)
    try:
        sender = join_group(engine, free_port())
        weights = trainer_weights(scale=1.5)
        plan = plan_buckets(manifest_of(weights), bucket_bytes=16 << 10)
        assert len(plan) > 3

        engine.check_weights_update(plan)  # the checkpoint check, then the session opens
        sent = threading.Thread(target=sender.send, args=(plan, iter(weights), 7))
        sent.start()
        stats = engine.update_weights_from_distributed(plan, version=7)
        sent.join()

        assert engine.weight_version == 7
        assert stats.buckets == len([b for b in plan if b.nbytes])
        received = requests.get(f"{engine.url}/_received", timeout=10).json()
        assert received == {name: sha256(t) for name, t in weights}  # bit for bit
        calls = requests.get(f"{engine.url}/_recorded", timeout=10).json()
        paths = [c["path"] for c in calls]
        assert paths == [
            "/init_weights_update_group",
            "/begin_weight_update",
            *["/update_weights_from_distributed"] * stats.buckets,
            "/end_weight_update",
        ]
        init = calls[0]["body"]
        assert (init["rank_offset"], init["world_size"], init["backend"]) == (1, 2, "gloo")
        updates = [c["body"] for c in calls if c["path"] == "/update_weights_from_distributed"]
        assert [u["flush_cache"] for u in updates] == [False] * (len(updates) - 1) + [True]
        assert [u["weight_version"] for u in updates] == [None] * (len(updates) - 1) + ["7"]
        assert [n for u in updates for n in u["names"]] == [n for n, _ in weights]
        assert {u["load_format"] for u in updates} == {"flattened_bucket"}
    finally:
        engine.shutdown()


def test_a_server_without_weight_update_sessions_is_updated_without_them(
    model_dir, tmp_path, monkeypatch
):
    """sglang 0.5.17 (what serves on the GPU machine) has no `/begin_weight_update`: the engine
    finds that out from the server and sends the update without a session."""
    monkeypatch.setenv(WITHOUT_SESSIONS, "1")  # the double answers as sglang 0.5.17
    engine = make_engine(model_dir, tmp_path, RECEIVER)
    try:
        assert not engine.weight_sessions
        sender = join_group(engine, free_port())
        weights = trainer_weights(scale=0.5)
        plan = plan_buckets(manifest_of(weights), bucket_bytes=16 << 10)
        engine.check_weights_update(plan)
        sent = threading.Thread(target=sender.send, args=(plan, iter(weights), 3))
        sent.start()
        stats = engine.update_weights_from_distributed(plan, version=3)
        sent.join()

        assert engine.weight_version == 3
        received = requests.get(f"{engine.url}/_received", timeout=10).json()
        assert received == {name: sha256(t) for name, t in weights}
        paths = [c["path"] for c in requests.get(f"{engine.url}/_recorded", timeout=10).json()]
        assert paths == [
            "/init_weights_update_group",
            *["/update_weights_from_distributed"] * stats.buckets,
        ]
    finally:
        engine.shutdown()


def test_a_plan_that_does_not_match_the_checkpoint_is_refused_before_the_session(
    model_dir, tmp_path
):
    engine = make_engine(model_dir, tmp_path, RECEIVER)
    try:
        weights = trainer_weights(scale=1.0)
        renamed = [("model.layers.0.mlp.gate.weights", weights[8][1]), *weights[1:8]]
        wrong_shape = [(weights[0][0], weights[0][1][:-1])]
        for bad, reason in (
            (renamed, "is not in the checkpoint"),
            (wrong_shape, r"is \[\d+, \d+\], not \["),
        ):
            plan = plan_buckets(manifest_of(bad), bucket_bytes=16 << 10)
            with pytest.raises(WeightSyncError, match=reason):
                engine.check_weights_update(plan)
        assert requests.get(f"{engine.url}/_recorded", timeout=10).json() == []
        with pytest.raises(WeightSyncError, match="check_weights_update first"):
            engine.update_weights_from_distributed(plan, version=1)
    finally:
        engine.shutdown()


def test_a_slow_health_answer_is_not_a_dead_server(model_dir, tmp_path, monkeypatch):
    """SGLang's /health runs a one-token generation and may take up to 20 s: an answer after
    7 s (beyond the 5 s once allowed) keeps the engine."""
    monkeypatch.setenv("STAND_IN_SLOW_HEALTH", "7")
    engine = make_engine(model_dir, tmp_path, STAND_IN)
    try:
        url = engine.url
        assert engine.ensure_running() is False
        assert engine.url == url
    finally:
        engine.shutdown()


@pytest.mark.parametrize(("failures", "restarted"), [(2, False), (3, True)])
def test_only_consecutive_failed_probes_restart_an_engine(
    model_dir, tmp_path, monkeypatch, capsys, failures, restarted
):
    monkeypatch.setenv("STAND_IN_HEALTH_FAILS", str(failures))
    engine = make_engine(model_dir, tmp_path, STAND_IN)
    try:
        assert engine.ensure_running() is restarted
        out = capsys.readouterr().out
        assert out.count("/health failed") == failures
        assert ("failed 3 health probes in a row" in out) == restarted
    finally:
        engine.shutdown()


def test_a_dead_server_is_restarted_and_leaves_the_weight_group(model_dir, tmp_path, capsys):
    engine = make_engine(model_dir, tmp_path, STAND_IN)
    try:
        assert engine.ensure_running() is False
        engine.connect_peers([engine.url, "http://127.0.0.1:1"])
        engine.group_name, engine.weight_version = "weight_update_group", 3
        engine.released = {*WEIGHT_MEMORY, *CACHE_MEMORY}  # it crashes while released
        old_url = engine.url
        engine.local._process.kill()  # the server crashes
        engine.local._process.wait()

        assert engine.ensure_running() is True
        out = capsys.readouterr().out
        assert "restarting" in out and "exited with code -9" in out
        assert "stand-in server (not SGLang)" in out  # its log tail, in the job log
        assert requests.get(f"{engine.url}/health", timeout=10).status_code == 200
        assert engine.url != old_url  # a fresh port
        assert engine.client.live_urls == [engine.url, "http://127.0.0.1:1"]  # peers kept
        assert (engine.group_name, engine.weight_version) == (None, 0)  # rejoin, then sync
        assert engine.released == set()  # the new server holds all its memory: none to resume
    finally:
        engine.shutdown()
    assert not engine.local.alive()


def test_a_restarted_rollout_actor_stops_the_server_its_killed_predecessor_left(
    model_dir, tmp_path, capsys
):
    """Ray restarts a rollout actor killed with SIGKILL, but its server, in a session of its
    own, lives on and holds the GPUs: the new incarnation's engine (same index, same output
    folder) kills it before it starts its own."""
    first = make_engine(model_dir, tmp_path, STAND_IN)  # its actor is then killed: no shutdown
    orphan = first.local._process
    reaper = threading.Thread(target=orphan.wait, daemon=True)  # init reaps a real orphan
    reaper.start()
    second = make_engine(model_dir, tmp_path, STAND_IN)
    try:
        reaper.join(timeout=60)
        assert orphan.returncode == -9
        assert f"left by its previous actor (pid {orphan.pid})" in capsys.readouterr().out
        assert requests.get(f"{second.url}/health", timeout=10).status_code == 200
    finally:
        second.shutdown()
    assert not second.local.pid_path.exists()  # a clean stop leaves nothing to clean up


def test_generation_requests_carry_whole_groups():
    a, b = [1, 2], [3]
    assert _runs([a, a, a, b, b, a]) == [[a, a, a], [b, b], [a]]
    assert [len(g) for g in _runs([a] * 130)] == [64, 64, 2]


def test_colocated_update_by_handles_is_decoded_by_sglangs_serializer(model_dir, tmp_path):
    """Two engine ranks, each handed the bucket packed by the training rank on its own GPU
    (here in shared memory; CUDA IPC on GPUs): the server's rank k decodes entry k with
    sglang's own MultiprocessingSerializer and bucket views. The two ranks' trainers send
    different weights here, so a rank that read another's entry would be seen. Memory goes as
    the colocated driver has it: all released for training, then the weights resumed before
    the update and the KV cache and CUDA graphs after it."""
    torch.multiprocessing.set_sharing_strategy("file_system")  # handles between unrelated processes
    engine = make_engine(model_dir, tmp_path, [*RECEIVER, "--tp-size", "2"], gpus_per_engine=2)
    try:
        weights = [trainer_weights(scale=0.5), trainer_weights(scale=0.25)]  # per engine rank
        plan = plan_buckets(manifest_of(weights[0]), bucket_bytes=16 << 10)
        exports = [IpcExport(iter(w), serving=True, device=torch.device("cpu")) for w in weights]
        engine.release_memory()
        engine.resume_memory(WEIGHT_MEMORY)
        engine.check_weights_update(plan)
        sent = [b for b in plan if b.nbytes]
        for bucket in plan:
            handles = [export.bucket(bucket) for export in exports]
            if bucket.nbytes:
                last = bucket is sent[-1]
                engine.update_weights_from_tensor(handles, 9 if last else None)
        for export in exports:
            export.finish()
        engine.finish_weight_update(9)
        engine.resume_memory(CACHE_MEMORY)
        engine.resume_memory(CACHE_MEMORY)  # nothing left released: no request

        assert engine.weight_version == 9
        for tp_rank, sent_weights in enumerate(weights):
            received = requests.get(f"{engine.url}/_received?tp_rank={tp_rank}", timeout=10)
            assert received.json() == {name: sha256(t) for name, t in sent_weights}
        calls = requests.get(f"{engine.url}/_recorded", timeout=10).json()
        assert [(c["path"], c["body"].get("tags")) for c in calls if "memory" in c["path"]] == [
            ("/release_memory_occupation", None),  # every region
            ("/resume_memory_occupation", ["weights"]),
            ("/resume_memory_occupation", ["kv_cache", "cuda_graph"]),
        ]
        assert [c["path"] for c in calls] == [
            "/release_memory_occupation",
            "/resume_memory_occupation",
            "/begin_weight_update",
            *["/update_weights_from_tensor"] * len(sent),
            "/end_weight_update",
            "/resume_memory_occupation",
        ]
        updates = [c["body"] for c in calls[3:-2]]
        assert {len(u["serialized_named_tensors"]) for u in updates} == {engine.weight_ranks}
        assert {u["load_format"] for u in updates} == {"flattened_bucket"}
        assert [u["weight_version"] for u in updates][-2:] == [None, "9"]
        with pytest.raises(WeightSyncError, match="has 2 ranks but got 1 CUDA IPC handles"):
            engine.update_weights_from_tensor(handles[:1], None)
    finally:
        engine.shutdown()


def test_a_server_that_fails_at_start_fails_the_engine_with_its_log(
    model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("STAND_IN_EXIT", "3")
    with pytest.raises(EngineFailure, match=r"exited with code 3(.|\n)*stand-in failing"):
        make_engine(model_dir, tmp_path, STAND_IN)
