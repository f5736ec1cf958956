"""Shared test set-up."""

import os

# Before Ray is imported anywhere: under `uv run pytest`, Ray would otherwise rebuild the
# project's environment for every worker process (see driver.py).
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
