"""Joining or starting the Ray cluster the run's actors live on."""

import os
from pathlib import Path

import ray

REPO_ROOT = Path(__file__).resolve().parent.parent


def connect_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one.

    Actors import this repository's modules and the user's (a reward function). Under `ray
    job submit --working-dir .` Ray ships the folder and runs them in it; when the driver
    starts its own local cluster, the workers get the repository root and the driver's working
    directory on PYTHONPATH instead (same machine, so the paths are valid for them).
    """
    if ray.is_initialized():
        return

    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = None
    if not _inside_ray_job():
        runtime_env = {"env_vars": {"PYTHONPATH": worker_pythonpath()}}
    # "local" starts a fresh cluster rather than joining whichever one this machine runs.
    ray.init(
        address=address or "local",
        runtime_env=runtime_env,
        logging_level="ERROR",
        log_to_driver=True,
    )


def _inside_ray_job() -> bool:
    return bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def worker_pythonpath() -> str:
    """The repository root, the working directory, then the caller's PYTHONPATH."""
    parts = [str(REPO_ROOT), os.getcwd(), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    return os.pathsep.join(dict.fromkeys(part for part in parts if part))
