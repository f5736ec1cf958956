"""Shared test set-up, and how the suite runs in parallel.

`uv run pytest` runs the suite on pytest-xdist workers (`-n auto --dist loadfile
--no-loadscope-reorder`, in pyproject.toml): each test file stays on one worker, so a file's
module-scoped Ray cluster or torchrun world is built once, and files are handed out in the
order below (xdist would otherwise order them by their number of tests, which put the slowest
file, a single test, last: four minutes with one worker idle).

What the time goes to (2-core machine, two workers, 2026-12-05, 1095 s in all): start-up, not
computation. Each learning or fault run starts a Ray cluster (~5 s) and four actor processes
that import torch and transformers (~20 s on two busy cores), then trains the built-in task
(60-120 s); each Megatron file starts torchrun worlds that import megatron-core (~20 s per
world). Slowest tests: test_megatron_loop (182 s, two driver runs), test_loop's default job
(140 s) and its module cluster (65 s), test_job_submit (121 s), test_deadlines (103 s),
test_torch_resume (102 s, two driver runs), test_cli's raising-reward run (79 s), test_faults'
killed rollout actor (77 s), test_stop_signals (64 s per signal); file totals in
SLOWEST_FIRST's order.
"""

import os

# Before Ray is imported anywhere: under `uv run pytest`, Ray would otherwise rebuild the
# project's environment for every worker process (see driver.py).
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

SLOWEST_FIRST = [
    "test_loop.py",
    "test_megatron_loop.py",
    "test_faults.py",
    "test_stop_signals.py",
    "test_algorithms.py",
    "test_megatron_checkpoint.py",
    "test_job_submit.py",
    "test_deadlines.py",
    "test_megatron.py",
    "test_torch_resume.py",
    "test_cli.py",
    "test_weight_group_rebuild.py",
    "test_partial_rollout.py",
    "test_weight_sync.py",
    "test_engine.py",
    "test_sglang_engine.py",
]
"""Measured file totals, longest first (see above); the rest follow in their own order."""


def pytest_collection_modifyitems(session, config, items):
    """Hand the slowest files out first (a stable sort keeps each file's own order)."""

    def rank(item) -> int:
        name = item.path.name
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core, at least two and at most four. A worker running a
    learning or fault test holds a Ray cluster of four actors that import torch (5-7 GB with
    the driver); three such workers on the 24 GB two-core machine reached Ray's out-of-memory
    killer (95 % of memory) on 2026-12-05, two stay well below it."""
    return max(2, min(os.cpu_count() or 1, 4))
