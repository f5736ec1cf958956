"""Process handling of the SGLang engine: start, health wait, log tail, stop, restart.

The process is `tests/stand_in_server.py`, a stand-in that answers /health (SGLang itself
cannot run on this machine); what is tested is our handling of a server process, with the
launch arguments Sluice generates for a real engine.
"""

import os
import socket
import sys
import time
from pathlib import Path

import pytest

import driver
from inference.sglang.launch import resolve_server_args, server_launches
from inference.sglang.server import EngineFailure, ServerProcess, wait_healthy
from placement.cluster import synthetic_cluster
from placement.planner import plan_layout

pytestmark = pytest.mark.sglang

STAND_IN = [sys.executable, str(Path(__file__).with_name("stand_in_server.py"))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


@pytest.fixture
def launch(tmp_path):
    """Engine 0's launch on a 1 x 2 GPU plan, with a real free port."""
    model = tmp_path / "model"
    model.mkdir()
    config, _ = driver.parse_args(
        ["--rollout.engine", "sglang", "--model.hf_checkpoint", str(model),
         "--train.num_workers", "1", "--rollout.num_engines", "1",
         "--rollout.batch_size", "8", "--sglang-mem-fraction-static", "0.5"]
    )  # fmt: skip
    layout = plan_layout(synthetic_cluster(1, 2, 8.0), config)
    resolved = resolve_server_args(config, None)
    port = free_port()
    (server,) = server_launches(config, layout, 0, resolved, port=port, dist_init_port=1)
    return server, f"http://127.0.0.1:{port}"


def healthy(url: str) -> bool:
    from inference.sglang.engine import _healthy

    return _healthy(url)


def test_a_started_server_is_waited_for_and_stopped(launch, tmp_path):
    server_launch, url = launch
    process = ServerProcess(server_launch, tmp_path, program=STAND_IN)
    process.start()
    try:
        assert wait_healthy(url, [process], timeout_s=30, probe=healthy, poll_s=0.1) < 30
        assert process.alive()
        log = process.log_tail()
        assert "--mem-fraction-static 0.5" in log and "not SGLang" in log
        assert f"CUDA_VISIBLE_DEVICES={server_launch.visible_devices}" in log
    finally:
        process.stop()
    assert not process.alive() and not healthy(url)


def test_a_server_that_exits_is_reported_with_its_log_tail(launch, tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_IN_EXIT", "3")
    process = ServerProcess(launch[0], tmp_path, program=STAND_IN)
    process.start()
    start = time.monotonic()
    with pytest.raises(EngineFailure) as failure:
        wait_healthy(launch[1], [process], timeout_s=60, probe=healthy, poll_s=0.1)
    assert time.monotonic() - start < 30  # at once, not at the timeout
    message = str(failure.value)
    assert "engine 0 node_rank 0" in message and "exited with code 3" in message
    assert "stand-in failing" in message and str(process.log_path) in message


def test_a_server_that_never_answers_times_out_naming_the_setting(launch, tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_IN_MUTE", "1")
    process = ServerProcess(launch[0], tmp_path, program=STAND_IN)
    process.start()
    try:
        with pytest.raises(EngineFailure, match=r"rollout\.sglang\.startup_timeout_s"):
            wait_healthy(launch[1], [process], timeout_s=1.5, probe=healthy, poll_s=0.1)
    finally:
        process.stop(grace_s=5)


def test_stop_ends_the_whole_process_group(launch, tmp_path, monkeypatch):
    """SGLang's scheduler processes would hold the GPUs if only the parent were killed."""
    pid_file = tmp_path / "child.pid"
    monkeypatch.setenv("STAND_IN_CHILD", "1")
    monkeypatch.setenv("STAND_IN_CHILD_PID_FILE", str(pid_file))
    process = ServerProcess(launch[0], tmp_path, program=STAND_IN)
    process.start()
    wait_healthy(launch[1], [process], timeout_s=30, probe=healthy, poll_s=0.1)
    child = int(pid_file.read_text())
    process.stop(grace_s=5)
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited
        return stat.read().split()[2] != "Z"
