"""A short run submitted with `ray job submit` to a real `ray start --head` cluster.

The job must succeed, its log must stream the per-step lines while it runs, and the metrics
targets that the dashboard lists for Prometheus (`/api/prometheus/sd`, what the Metrics page's
Grafana reads through Prometheus) must serve the run's `sluice_*` metrics with the run's values.

The cluster is stopped by its process group, not `ray stop`: `ray stop` ends every Ray process
on the machine, other test runs' clusters included.
"""

import json
import math
import os
import re
import secrets
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

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"
STEPS = 3
REPORT_INTERVAL_MS = 1000  # Ray's floor; gauges of an exited driver vanish after two intervals
JOB_DEADLINE_S = 200.0
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


def test_submitted_run_succeeds_streams_steps_and_exports_dashboard_metrics(tmp_path):
    started = time.monotonic()
    temp_dir = tempfile.mkdtemp(prefix="sluice-ray-", dir="/tmp")  # socket paths stay short
    head = HeadNode(temp_dir)
    output_dir = str(tmp_path / "run")
    submission_id = f"sluice-test-{secrets.token_hex(4)}"
    status = None
    try:
        head.start()
        entrypoint = [
            sys.executable, "driver.py", "--config", "recipes/tiny.yaml",
            "--num_steps", str(STEPS), "--rollout.batch_size", "64",
            "--train.num_workers", "1", "--rollout.num_engines", "1",  # two actors are enough
            "--logging.eval_every", "0", "--logging.save_final_model", "false",
            "--logging.output_dir", output_dir,
        ]  # fmt: skip
        command = [
            str(RAY), "job", "submit", "--address", head.dashboard,
            "--submission-id", submission_id, "--working-dir", ".",
            # .gitignore keeps .venv and outputs out of the upload; .git is not ignored
            "--runtime-env-json", json.dumps({"excludes": [".git"]}),
            "--no-wait", "--", *entrypoint,
        ]  # fmt: skip
        submit = subprocess.run(
            command,
            cwd=REPO,
            env=head.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert submit.returncode == 0, submit.stdout + submit.stderr

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
        print(f"job {submission_id}: {time.monotonic() - started:.1f}s from ray start to checks")
    finally:
        try:
            if status not in TERMINAL and head.pgid is not None:
                head.get(f"{head.dashboard}/api/jobs/{submission_id}/stop", data=b"")
        except OSError:
            pass
        finally:
            head.stop()
            shutil.rmtree(temp_dir, ignore_errors=True)
