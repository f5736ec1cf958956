"""Joining or starting the Ray cluster the run's actors live on."""

import os
from pathlib import Path

import ray

REPO_ROOT = Path(__file__).resolve().parent.parent


def connect_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one.

    Actors import this repository's modules. Under `ray job submit --working-dir .` Ray ships
    the folder already; when the driver starts its own local cluster, the workers get the
    repository root on PYTHONPATH instead (same machine, so the path is valid for them).
    """
    if ray.is_initialized():
        return

    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = None
    if not _inside_ray_job():
        runtime_env = {"env_vars": {"PYTHONPATH": _pythonpath_with_repo()}}
    # "local" starts a fresh cluster rather than joining whichever one this machine runs.
    ray.init(
        address=address or "local",
        runtime_env=runtime_env,
        logging_level="ERROR",
        log_to_driver=True,
    )


def _inside_ray_job() -> bool:
    return bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def _pythonpath_with_repo() -> str:
    current = os.environ.get("PYTHONPATH")
    return f"{REPO_ROOT}{os.pathsep}{current}" if current else str(REPO_ROOT)
