"""The seed's multi-node rules, on a real two-node Ray cluster on this machine.

The second node's raylet runs in its own mount namespace with an empty file system mounted
over the run's shared directory, exactly what a node without the shared mount sees. Needs
root (mount namespaces), as the CI machine has.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

import driver
from actors.loop import Driver
from config.errors import UserError
from models.tiny import tiny_config
from placement.cluster import synthetic_cluster
from placement.multinode import apply_cpu_adam_rule
from placement.planner import plan_layout

pytestmark = pytest.mark.cluster

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def shared(tmp_path):
    """The run's "shared file system": a model directory and a prompt file."""
    root = tmp_path / "shared"
    tiny_config().save_pretrained(root / "model")  # config.json of the built-in tiny MoE
    (root / "prompts.jsonl").write_text('{"prompt": "1 2 3 4 =", "label": "1"}\n')
    return root


@pytest.fixture
def two_nodes(shared):
    """A head node (this process's view) and a node that does not mount `shared`."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    hide = f"mount -t tmpfs tmpfs {shared} && exec {RAY} start --address={cluster.address} "
    hide += "--num-cpus 2 --block"
    # Its own process group: stopping it must not touch any other Ray on the machine (never
    # `ray stop`, which ends every Ray process of the machine).
    worker = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", hide],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        ray.init(address=cluster.address)
        deadline = time.monotonic() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            if worker.poll() is not None:
                pytest.fail(f"the second node's raylet exited: {worker.stderr.read()[-2000:]}")
            assert time.monotonic() < deadline, "the second node did not join in 120 s"
            time.sleep(0.5)
        yield cluster
    finally:
        ray.shutdown()
        _stop_group(worker)
        cluster.shutdown()


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the node's process group (`ray start --block` and its raylet), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_a_path_missing_on_one_node_is_named_before_any_actor_starts(shared, two_nodes, tmp_path):
    config, _ = driver.parse_args(
        ["--model.hf_checkpoint", str(shared / "model"),
         "--data.prompt_data", str(shared / "prompts.jsonl"),
         "--train.num_workers", "2", "--rollout.num_engines", "1",
         "--placement.cpus_per_bundle", "1",  # 3 bundles of 1 CPU: the plan needs both nodes
         "--logging.output_dir", str(tmp_path / "out")]
    )  # fmt: skip
    with pytest.raises(UserError) as error:
        Driver(config, ray_address=two_nodes.address)
    message = str(error.value)
    assert f"model.hf_checkpoint={shared / 'model'} is not visible on node" in message
    worker = next(n for n in ray.nodes() if n["Alive"] and n["NodeID"] != _head_id())
    assert worker["NodeID"][:8] in message  # the node is named
    assert "file system that every node mounts" in message
    assert not [a for a in ray.util.list_named_actors() if a.startswith("sluice-")]
    assert not ray.util.placement_group_table()  # nothing was reserved either


def test_a_checkpoint_directory_that_is_not_shared_is_named(shared, two_nodes, tmp_path):
    """Reads pass (the model is outside the hidden directory); the save root is not shared."""
    model = tmp_path / "visible-model"
    shutil.copytree(shared / "model", model)
    config, _ = driver.parse_args(
        ["--model.hf_checkpoint", str(model), "--save", str(shared / "ckpt"),
         "--train.backend", "megatron",
         "--train.num_workers", "2", "--rollout.num_engines", "1",
         "--placement.cpus_per_bundle", "1", "--logging.output_dir", str(tmp_path / "out")]
    )  # fmt: skip
    with pytest.raises(UserError, match=r"checkpoint\.save=.*ckpt is not visible on node .*"):
        Driver(config, ray_address=two_nodes.address)
    # The marker was written on the plan's first node (either of the two: their order is by
    # node id) and is gone from this node's view either way.
    assert not list(shared.glob("ckpt/.sluice-visible-*"))


def _head_id() -> str:
    return ray.get_runtime_context().get_node_id()


def test_cpu_adam_is_turned_off_across_nodes_unless_kept(capsys):
    argv = ["--train.backend", "megatron", "--train.num_workers", "16",
            "--optimizer-cpu-offload", "--overlap-cpu-optimizer-d2h-h2d",
            "--use-precision-aware-optimizer", "--rollout.num_engines", "1",
            "--rollout.gpus_per_engine", "1"]  # fmt: skip
    config, _ = driver.parse_args(argv)
    notice = apply_cpu_adam_rule(config, plan_layout(synthetic_cluster(3, 8, 64.0), config))
    assert notice and "span 2 nodes" in notice and "cpu_adam_on_multiple_nodes" in notice
    train = config.train
    assert not (train.optimizer_cpu_offload or train.overlap_cpu_optimizer_d2h_h2d)
    assert not train.use_precision_aware_optimizer

    kept, _ = driver.parse_args([*argv, "--train.cpu_adam_on_multiple_nodes", "true"])
    assert apply_cpu_adam_rule(kept, plan_layout(synthetic_cluster(3, 8, 64.0), kept)) is None
    assert kept.train.optimizer_cpu_offload

    one_node, _ = driver.parse_args([*argv[:3], "8", *argv[4:]])
    assert (
        apply_cpu_adam_rule(one_node, plan_layout(synthetic_cluster(1, 16, 64.0), one_node)) is None
    )
    assert one_node.train.optimizer_cpu_offload
