"""A real SGLang server on a GPU, driven by Sluice's own engine and driver.

What the device run (`bench/run_gpu_sglang.sh`) executes; skipped where there is no GPU or no
SGLang with its CUDA kernels (CPU machines install only SGLang's parser and request classes).
On the GPU machine the server is sglang 0.5.17 (the version its torch 2.11 allows, packed by
`bench/pack_sglang_run.sh`), started with the backends that bundle carries
(`DEVICE_BUNDLE_FLAGS`). The tiny built-in Qwen3-MoE is saved as a Hugging Face directory, which the
server loads and the trainer reads.

- The engine's colocated update (memory released, weights resumed, each bucket by CUDA IPC
  handle through `/update_weights_from_tensor`, cache resumed) writes the trainer's weights
  bit for bit: SGLang's own weight checker (`/weights_checker`: `snapshot`, then `compare`,
  bitwise on every parameter and buffer of the served model) finds the server's weights equal
  to the checkpoint it loaded after the weights went away (x2) and came back.
- The loop learns the built-in task through the server, colocated on one GPU, with and without
  routing replay (R3: the trainer replays the experts SGLang routed each token to).
- `rollout.partial: abort` aborts SGLang's generation: the engine posts `/abort_request` and
  returns at once.
"""

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from bench.bench_sglang import DEVICE_BUNDLE_FLAGS, colocated_sync, make_sglang_engine
from inference.engine import SamplingParams
from inference.sglang.engine import SglangEngine
from models.checkpoint_format import checkpoint_tensors
from models.tiny import BOS, VOCAB, build_tiny_model, save_tiny_model

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.sglang,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        importlib.util.find_spec("sgl_kernel") is None,
        reason="needs SGLang with its CUDA kernels (sglang-kernel): GPU nodes only; "
        "bench/pack_sglang_run.sh packs them for the device machine",
    ),
]

SEED = 1234  # the run's default seed: the saved model is the built-in one


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), SEED)


def make_engine(model_dir: Path, tmp_path: Path, *flags: str) -> SglangEngine:
    memory = ("--sglang-mem-fraction-static", "0.3", "--sglang-disable-cuda-graph")
    return make_sglang_engine(model_dir, tmp_path, *memory, *flags)


def weights_checker(engine: SglangEngine, action: str) -> dict:
    reply = requests.post(f"{engine.url}/weights_checker", json={"action": action}, timeout=120)
    return {"status": reply.status_code, **reply.json()}


def sync_by_ipc(engine: SglangEngine, weights: list[tuple[str, torch.Tensor]], version: int):
    colocated_sync(engine, weights, version, bucket_bytes=64 << 10)  # several buckets


def prompts(count: int) -> list[list[int]]:
    digits = [VOCAB.index(str(d)) for d in range(10)]
    return [[VOCAB.index(BOS), digits[k % 10], digits[(3 * k) % 10]] for k in range(count)]


def test_a_colocated_update_writes_the_trainers_weights_bit_for_bit(model_dir, tmp_path):
    engine = make_engine(model_dir, tmp_path)
    try:
        print(f"served by sglang {engine.server_version}")
        assert weights_checker(engine, "snapshot")["success"]  # the checkpoint, loaded from disk
        original = list(checkpoint_tensors(build_tiny_model(SEED)))
        sync_by_ipc(engine, [(name, t * 2) for name, t in original], version=1)
        changed = weights_checker(engine, "compare")
        assert not changed["success"], "the update did not change the served weights"
        completions = engine.generate(prompts(4), SamplingParams(8, 1.0, 1.0, -1, seed=1))
        assert {c.weight_version for c in completions} == {1}

        sync_by_ipc(engine, original, version=2)
        same = weights_checker(engine, "compare")
        assert same["success"], same["message"]  # every tensor equal to the disk load's, bitwise
        completions = engine.generate(prompts(4), SamplingParams(8, 1.0, 1.0, -1, seed=1))
        assert {c.weight_version for c in completions} == {2}
        assert all(len(c.token_ids) == len(c.log_probs) > 0 for c in completions)
    finally:
        engine.shutdown()


def test_an_abort_stops_sglangs_generation_at_once(model_dir, tmp_path):
    engine = make_engine(model_dir, tmp_path, "--sglang-max-running-requests", "8")
    try:
        stop = threading.Event()
        engine.should_stop = stop.is_set
        params = SamplingParams(48, 1.0, 1.0, -1, seed=1)
        engine.generate(prompts(8), params)  # warm: the first forward compiles Triton kernels
        start = time.perf_counter()
        baseline = engine.generate(prompts(512), params)
        full = time.perf_counter() - start
        assert len(baseline) == 512
        outcome: dict = {}

        def generate():
            try:
                outcome["completions"] = engine.generate(prompts(512), params)
            except Exception as e:  # the engine's abort error
                outcome["error"] = e

        worker = threading.Thread(target=generate)
        worker.start()
        time.sleep(full / 4)
        stop.set()
        aborted_at = time.perf_counter()
        worker.join(timeout=full)
        assert not worker.is_alive()
        waited = time.perf_counter() - aborted_at
        print(f"512 x 48 tokens: {full:.2f} s in full; returned {waited:.2f} s after the abort")
        assert "error" in outcome, "generation ran to the end"
        assert waited < full / 2
        stop.clear()
        assert len(engine.generate(prompts(4), params)) == 4  # the server serves on
    finally:
        engine.shutdown()


def run_loop(model_dir: Path, out: Path, steps: int, *flags: str) -> list[dict]:
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    command = [
        sys.executable, "driver.py", "--rollout.engine", "sglang",
        "--model.hf_checkpoint", str(model_dir), "--seed", str(SEED),
        "--train.num_workers", "1", "--rollout.num_engines", "1",
        "--placement.colocate", "true", "--placement.cpus_per_bundle", "1",
        "--num_steps", str(steps), "--logging.progress_bar", "false",
        "--logging.output_dir", str(out), "--rollout.sglang.startup_timeout_s", "240",
        *DEVICE_BUNDLE_FLAGS, "--sglang-mem-fraction-static", "0.3",
        "--sglang-disable-cuda-graph", *flags,
    ]  # fmt: skip
    subprocess.run(command, cwd=REPO, env=env, check=True, timeout=600)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("replay", [False, True], ids=["routing", "routing_replay"])
def test_the_loop_learns_through_a_colocated_sglang_server(model_dir, tmp_path, replay):
    steps = 60
    flags = ["--algorithm.routing_replay", str(replay).lower()]
    metrics = run_loop(model_dir, tmp_path / "run", steps, *flags)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    print(json.dumps({k: summary[k] for k in sorted(summary) if "eval" in k or "time" in k}))
    assert summary["last_eval_accuracy"] >= 0.9
    assert summary["weight_version"] == steps
    versions = [m["rollout/weight_version"] for m in metrics if "rollout/weight_version" in m]
    assert versions and max(versions) >= steps - 2  # the server reported the synced versions
    log = (tmp_path / "run" / "sglang" / "sglang-engine0-node0.log").read_text()
    assert ("enable_return_routed_experts=True" in log) == replay  # SGLang's own ServerArgs
