"""Per-step metrics for the Ray dashboard's Metrics page, written by the driver only.

`RayMetrics.record` turns the driver's step (or evaluation) metrics into `ray.util.metrics`
gauges and a counter. Ray's metrics agent on each node serves them as Prometheus text
(`ray start --metrics-export-port`); the dashboard lists those agents for Prometheus at
`/api/prometheus/sd`, and its Metrics page shows them through Grafana. In Prometheus every
name gets Ray's `ray_` prefix (`ray_sluice_weight_version`; the counter also gets `_total`).

Every series carries two tags: `run` (the run's `logging.output_dir`) and `job` (the Ray job
id), so two jobs on one cluster never mix, even with the same output directory. Ray exports
every `RAY_metrics_report_interval_ms` (default 10 s); a gauge of a driver that has exited
disappears two intervals later, while the steps counter stays until the node's agent restarts.
"""

import math

import ray
from ray.util.metrics import Counter, Gauge

RUN_TAGS = ("run", "job")


class RayMetrics:
    """The run's `sluice_*` metrics; `record` takes the dicts that `MetricsWriter` writes."""

    def __init__(self, run: str, job: str | None = None):
        if job is None:
            job = ray.get_runtime_context().get_job_id() if ray.is_initialized() else ""
        tags = {"run": run, "job": job}

        def gauge(name: str, description: str, *extra: str) -> Gauge:
            return Gauge(name, description, tag_keys=RUN_TAGS + extra).set_default_tags(tags)

        self.rollout_tokens_per_s = gauge(
            "sluice_rollout_tokens_per_second",
            "Response tokens generated per second of the last step's rollout phase (tokens/s).",
        )
        self.step_tokens_per_s = gauge(
            "sluice_step_tokens_per_second",
            "Prompt and response tokens of the last step per whole-step second (tokens/s).",
        )
        self.reward = gauge(
            "sluice_reward_mean",
            "Mean reward per sample (the reward function's units); split=rollout: the last "
            "step's samples, split=eval: the last greedy evaluation.",
            "split",
        )
        self.accuracy = gauge(
            "sluice_accuracy",
            "Fraction of correct samples (0 to 1); split=rollout: the last step's samples, "
            "split=eval: the last greedy evaluation.",
            "split",
        )
        self.phase_seconds = gauge(
            "sluice_step_phase_seconds",
            "Wall time of the last step by phase (s): rollout, train, sync (weight sync with "
            "engine checks), step (the whole step).",
            "phase",
        )
        self.sync_seconds = gauge(
            "sluice_weight_sync_seconds",
            "Transfer time of the last weight sync, handshake to last byte in place (s).",
        )
        self.sync_gb_per_s = gauge(
            "sluice_weight_sync_gb_per_second",
            "Bandwidth of the last weight sync (GB/s, 10^9 bytes per second).",
        )
        self.sync_bytes = gauge(
            "sluice_weight_sync_bytes", "Bytes of weights sent by the last weight sync (bytes)."
        )
        self.weight_version = gauge(
            "sluice_weight_version", "Weight version the engines hold after the last step."
        )
        self.steps_done = gauge(
            "sluice_steps_done", "RL steps the run has finished, resumed ones included (steps)."
        )
        self.steps = Counter(
            "sluice_steps",
            "RL steps finished by this driver process (steps); rate() gives steps per second.",
            tag_keys=RUN_TAGS,
        ).set_default_tags(tags)
        self._gauges = {
            "rollout/tokens_per_s": (self.rollout_tokens_per_s, None),
            "perf/tokens_per_s": (self.step_tokens_per_s, None),
            "rollout/reward_mean": (self.reward, {"split": "rollout"}),
            "eval/reward_mean": (self.reward, {"split": "eval"}),
            "rollout/accuracy": (self.accuracy, {"split": "rollout"}),
            "eval/accuracy": (self.accuracy, {"split": "eval"}),
            "time/rollout": (self.phase_seconds, {"phase": "rollout"}),
            "time/train": (self.phase_seconds, {"phase": "train"}),
            "time/sync": (self.phase_seconds, {"phase": "sync"}),
            "time/step": (self.phase_seconds, {"phase": "step"}),
            "sync/gb_per_s": (self.sync_gb_per_s, None),
            "sync/bytes": (self.sync_bytes, None),
            "weight_version": (self.weight_version, None),
        }

    def record(self, step_metrics: dict, step: int | None = None) -> None:
        """Set the gauges of the keys present (non-finite values are skipped); with `step`,
        the metrics are a finished training step's: steps done and the counter move too."""
        for key, (gauge, tags) in self._gauges.items():
            value = _finite(step_metrics.get(key))
            if value is not None:
                gauge.set(value, tags)
        nbytes = _finite(step_metrics.get("sync/bytes"))
        gb_per_s = _finite(step_metrics.get("sync/gb_per_s"))
        if nbytes is not None and gb_per_s:  # SyncStats.gb_per_s = nbytes / seconds / 1e9
            self.sync_seconds.set(nbytes / (gb_per_s * 1e9))
        elif nbytes is not None and step_metrics.get("sync/gb_per_s") == math.inf:
            self.sync_seconds.set(0.0)  # (a transfer faster than the clock's resolution)
        if step is not None:
            self.steps_done.set(step)
            self.steps.inc()


def _finite(value) -> float | None:
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None
