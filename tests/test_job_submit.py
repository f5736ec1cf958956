"""A short run submitted with `ray job submit` to a real `ray start --head` cluster.

The job must succeed, its log must stream the per-step lines while it runs, and the metrics
targets that the dashboard lists for Prometheus (`/api/prometheus/sd`, what the Metrics page's
Grafana reads through Prometheus) must serve the run's `sluice_*` metrics with the run's values.

The cluster is stopped by its process group, not `ray stop`: `ray stop` ends every Ray process
on the machine, other test runs' clusters included.
"""

import contextlib
import json
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_docs import commands_in

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"
STEPS = 3
REPORT_INTERVAL_MS = 1000  # Ray's floor; gauges of an exited driver vanish after two intervals
JOB_DEADLINE_S = 200.0
STALL_S = 15
"""How long the stopped job's reward stalls (tests/stalling_reward.py): its clean stop then
takes well beyond the 3 s that Ray's job supervisor gives a job by default."""
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
SAMPLE = re.compile(r"^(ray_sluice_\w+)\{(.*)\} (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class HeadNode:
    """`ray start --head` on free ports in its own process group, with token auth."""

    def __init__(self, temp_dir: str):
        ports = free_ports(7)
        self.port, self.dashboard_port, self.metrics_port = ports[:3]
        client, agent, agent_grpc, runtime_env_agent = ports[3:]
        self.token = secrets.token_hex(16)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")},
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",  # the job uses this venv as it is
            "RAY_metrics_report_interval_ms": str(REPORT_INTERVAL_MS),
            "RAY_AUTH_MODE": "token",  # Ray's default when ~/.ray/auth_token exists; made explicit
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.args = [
            str(RAY), "start", "--head", "--num-cpus", "4", "--num-gpus", "0",
            "--port", str(self.port), "--ray-client-server-port", str(client),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dashboard_port),
            "--dashboard-agent-listen-port", str(agent),
            "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env_agent),
            "--metrics-export-port", str(self.metrics_port),
            "--temp-dir", temp_dir, "--disable-usage-stats",
        ]  # fmt: skip
        self.pgid: int | None = None

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> None:
        # `ray start` exits once the daemons run; they stay in its process group.
        proc = subprocess.Popen(
            self.args,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.pgid = proc.pid
        output, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"ray start failed:\n{output[-4000:]}"

    def stop(self) -> None:
        if self.pgid is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait_s
            while _live_members(self.pgid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not _live_members(self.pgid):
                return

    def get(self, url: str, data: bytes | None = None) -> bytes:
        """GET (POST with `data`) with the cluster's token."""
        headers = {"Authorization": f"Bearer {self.token}"}
        request = urllib.request.Request(url, data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read()

    def get_json(self, path: str):
        return json.loads(self.get(self.dashboard + path))


def _live_members(pgid: int) -> list[int]:
    """Processes of the group that are not zombies (those wait for a parent that is gone)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def scrape(head: HeadNode, run: str) -> dict[tuple, float]:
    """The run's `ray_sluice_*` samples from every target that the dashboard gives Prometheus,
    keyed by (name, the labels beyond Ray's own and `run`)."""
    samples = {}
    for group in head.get_json("/api/prometheus/sd"):
        for target in group["targets"]:
            try:
                text = head.get(f"http://{target}/metrics").decode()
            except OSError:  # a target that is just starting or stopping
                continue
            for line in text.splitlines():
                match = SAMPLE.match(line)
                if not match:
                    continue
                name, labels, value = match.groups()
                labels = dict(LABEL.findall(labels))
                if labels.get("run") != run:
                    continue
                extra = tuple(
                    sorted((k, v) for k, v in labels.items() if k in ("job", "split", "phase"))
                )
                samples[(name, extra)] = float(value)
    return samples


@pytest.fixture(scope="module")
def head():
    """One `ray start --head` for the module's jobs (a cluster costs ~7 s of CPU to start)."""
    temp_dir = tempfile.mkdtemp(prefix="sluice-ray-", dir="/tmp")  # socket paths stay short
    node = HeadNode(temp_dir)
    try:
        node.start()
        yield node
    finally:
        node.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def documented_runtime_env() -> dict:
    """The runtime env of the `ray job submit` commands that README.md and docs/cluster.md
    give (the same in all, and in cluster.yaml's header): README's, and docs/cluster.md's for
    a `ray up` cluster and for a KubeRay RayCluster."""
    found = []
    for path in (REPO / "README.md", REPO / "docs" / "cluster.md"):
        for command in commands_in(path):
            tokens = shlex.split(command.text)
            if tokens[:5] == ["uv", "run", "ray", "job", "submit"]:
                assert "--runtime-env-json" in tokens, f"{command.where}: no runtime env"
                found.append(tokens[tokens.index("--runtime-env-json") + 1])
    assert len(found) >= 2 and len(set(found)) == 1, found
    assert f"--runtime-env-json '{found[0]}'" in (REPO / "cluster.yaml").read_text()
    return json.loads(found[0])


def submit(head: HeadNode, submission_id: str, entrypoint: list[str], runtime_env: dict) -> None:
    """`ray job submit --no-wait` of `entrypoint` with this folder as its working directory."""
    # .gitignore keeps .venv and outputs out of the upload; .git is not ignored
    runtime_env = {**runtime_env, "excludes": [".git"]}
    command = [
        str(RAY), "job", "submit", "--address", head.dashboard,
        "--submission-id", submission_id, "--working-dir", ".",
        "--runtime-env-json", json.dumps(runtime_env), "--no-wait", "--", *entrypoint,
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def stop_quietly(head: HeadNode, submission_id: str) -> None:
    """Stop a job a failed test left running, so that the next one gets the cluster."""
    with contextlib.suppress(OSError):
        head.get(f"{head.dashboard}/api/jobs/{submission_id}/stop", data=b"")


def job_logs(head: HeadNode, submission_id: str) -> str:
    return head.get_json(f"/api/jobs/{submission_id}/logs")["logs"]


def live_state(head: HeadNode, kind: str, job_id: str) -> list[dict]:
    """Ray's state API (`actors`, `placement_groups`): the job's entries not dead / removed."""
    reply = head.get_json(f"/api/v0/{kind}?limit=10000&detail=true")
    entries = reply["data"]["result"]["result"]
    owner = "job_id" if kind == "actors" else "creator_job_id"
    return [e for e in entries if e[owner] == job_id and e["state"] not in ("DEAD", "REMOVED")]


def test_submitted_run_succeeds_streams_steps_and_exports_dashboard_metrics(head, tmp_path):
    started = time.monotonic()
    output_dir = str(tmp_path / "run")
    submission_id = f"sluice-test-{secrets.token_hex(4)}"
    status = None
    try:
        entrypoint = [
            sys.executable, "driver.py", "--config", "recipes/tiny.yaml",
            "--num_steps", str(STEPS), "--rollout.batch_size", "64",
            "--train.num_workers", "1", "--rollout.num_engines", "1",  # two actors are enough
            "--logging.eval_every", "0", "--logging.save_final_model", "false",
            "--logging.output_dir", output_dir,
        ]  # fmt: skip
        submit(head, submission_id, entrypoint, documented_runtime_env())

        # Poll the job and the metrics while it runs: a finished driver's gauges vanish two
        # report intervals after it exits (its last values are flushed when it exits).
        seen: dict[tuple, float] = {}
        step_line_while_running = False
        finished_at = None
        deadline = time.monotonic() + JOB_DEADLINE_S
        while time.monotonic() < deadline:
            status = head.get_json(f"/api/jobs/{submission_id}")["status"]
            if status == "RUNNING" and not step_line_while_running:
                logs = head.get_json(f"/api/jobs/{submission_id}/logs")["logs"]
                step_line_while_running = f"step 1/{STEPS} reward" in logs
            seen.update(scrape(head, output_dir))
            if status in TERMINAL:
                finished_at = finished_at or time.monotonic()
                counted = [v for (name, _), v in seen.items() if name == "ray_sluice_steps_total"]
                if counted == [STEPS] or time.monotonic() - finished_at > 3.0:
                    break
            time.sleep(0.5)

        job = head.get_json(f"/api/jobs/{submission_id}")
        logs = head.get_json(f"/api/jobs/{submission_id}/logs")["logs"]
        assert status == "SUCCEEDED", f"job {status}: {job.get('message')}\n{logs[-6000:]}"
        for step in range(1, STEPS + 1):
            assert f"step {step}/{STEPS} reward" in logs, logs[-6000:]
        assert step_line_while_running, "the step lines reached the job log only at the end"
        assert "eval after step 3: accuracy" in logs

        lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
        last_step = [json.loads(line) for line in lines if "weight_version" in line][-1]
        job_tag = (("job", job["job_id"]),)

        def metric(name: str, **tags: str) -> float:
            key = (f"ray_sluice_{name}", tuple(sorted({**dict(job_tag), **tags}.items())))
            assert key in seen, f"{key} not exported; got {sorted(seen)}"
            return seen[key]

        assert metric("weight_version") == STEPS == last_step["weight_version"]
        assert metric("steps_done") == STEPS
        assert metric("steps_total") == STEPS
        assert metric("rollout_tokens_per_second") > 0
        assert metric("step_tokens_per_second") > 0
        phases = {p: metric("step_phase_seconds", phase=p) for p in ("rollout", "train", "sync")}
        assert all(seconds > 0 for seconds in phases.values()), phases
        assert metric("step_phase_seconds", phase="step") >= max(phases.values())
        assert metric("weight_sync_bytes") == last_step["sync/bytes"] > 0
        assert metric("weight_sync_gb_per_second") > 0
        assert 0 < metric("weight_sync_seconds") <= phases["sync"]
        for split in ("rollout", "eval"):
            assert 0.0 <= metric("accuracy", split=split) <= 1.0
            assert math.isfinite(metric("reward_mean", split=split))
        print(f"job {submission_id}: {time.monotonic() - started:.1f}s from submit to checks")
    finally:
        if status not in TERMINAL:
            stop_quietly(head, submission_id)


def test_ray_job_stop_finishes_the_step_saves_and_leaves_no_actor(head, tmp_path):
    """`ray job stop` in the middle of a step, the job submitted as the docs say: the run
    finishes the step, saves it, exits; Ray's supervisor does not SIGKILL it first."""
    output_dir, checkpoints = tmp_path / "run", tmp_path / "ckpt"
    trigger = tmp_path / "stall"
    submission_id = f"sluice-stop-{secrets.token_hex(4)}"
    runtime_env = documented_runtime_env()
    runtime_env["env_vars"] = {
        **runtime_env["env_vars"],
        "SLUICE_TEST_STALL_TRIGGER": str(trigger),
        "SLUICE_TEST_STALL_S": str(STALL_S),
    }
    entrypoint = [
        sys.executable, "driver.py", "--config", "recipes/tiny.yaml",
        "--num_steps", "1000", "--rollout.batch_size", "64",
        "--train.num_workers", "1", "--rollout.num_engines", "1",
        "--logging.eval_every", "0", "--logging.save_final_model", "false",
        "--logging.output_dir", str(output_dir), "--save", str(checkpoints),
        "--rollout.reward", "tests.stalling_reward:reward",
    ]  # fmt: skip
    status = None
    try:
        submit(head, submission_id, entrypoint, runtime_env)
        deadline = time.monotonic() + JOB_DEADLINE_S
        while "step 1/1000 reward" not in job_logs(head, submission_id):
            status = head.get_json(f"/api/jobs/{submission_id}")["status"]
            assert status not in TERMINAL and time.monotonic() < deadline, status
            time.sleep(0.5)
        trigger.touch()
        while not Path(f"{trigger}.taken").exists():  # a reward of a step is stalled now
            assert time.monotonic() < deadline, "the reward never stalled"
            time.sleep(0.1)
        job_id = head.get_json(f"/api/jobs/{submission_id}")["job_id"]
        running = live_state(head, "actors", job_id), live_state(head, "placement_groups", job_id)
        assert all(running), running  # what must be gone after the stop is seen here
        stop = subprocess.run(
            [str(RAY), "job", "stop", "--address", head.dashboard, submission_id],
            env=head.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert stop.returncode == 0, stop.stdout + stop.stderr
        job = head.get_json(f"/api/jobs/{submission_id}")
        status = job["status"]
    finally:
        if status not in TERMINAL:
            stop_quietly(head, submission_id)
    logs = job_logs(head, submission_id)
    assert status == "STOPPED", f"job {status}: {job.get('message')}\n{logs[-6000:]}"
    assert logs.count("sluice: SIGTERM received: stopping after the current step") == 1, logs
    assert "Traceback" not in logs, logs[-6000:]
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM"
    assert summary["steps"] >= 2  # step 1, then the one the stop came in
    saved = checkpoints / f"iter_{summary['steps']:07d}"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == str(
        summary["steps"]
    )
    assert (saved / "torch_state.pt").is_file()  # the torch backend's checkpoint is complete
    assert json.loads((saved / "sluice_state.json").read_text())["steps_done"] == summary["steps"]
    assert f"sluice: saved {saved}" in logs
    assert "sluice: warning" not in logs, logs  # the documented wait covers the timeouts
    deadline = time.monotonic() + 30  # ray.kill is asynchronous: the state API follows
    while left := live_state(head, "actors", job_id) + live_state(head, "placement_groups", job_id):
        assert time.monotonic() < deadline, left
        time.sleep(0.5)
