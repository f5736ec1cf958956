"""Shared test set-up, and how the suite runs in parallel.

`uv run pytest` runs the suite on pytest-xdist workers (`-n auto --dist loadfile
--no-loadscope-reorder`, in pyproject.toml): each test file stays on one worker, so a file's
module-scoped Ray cluster or torchrun world is built once, and files are handed out in the
order below (xdist would otherwise order them by their number of tests, which put the slowest
file, a single test, last: four minutes with one worker idle).

What the time goes to (2-core machine, two workers, 2026-12-07, CI's run from a fresh clone:
pytest 11:08, 11:11 and 11:30, 769 passed): CPU, not waiting. The machine is about 90 % busy (5 s
samples over a whole `bash .ci/run` on 2026-12-06; memory peaked at 9.6 of 24 GB), so the sum
of the test times (1288 s, from 948 s before issue 28's fault, stop, reward-pool and checkpoint
tests) over two cores is close to the wall time, and only less CPU work makes the suite faster
(a third worker would not). The same commit's wall time varies by about 10 % between runs. The
work is process start-up: each run of the driver starts a Ray cluster (~7 s of CPU) and actors
that import torch and transformers (~5 s of CPU each); both cost twice that while every process
compiled them from source, before the environment's bytecode was compiled at install (which
halved the suite); each torchrun world of the Megatron tests imports megatron-core. Slowest
files, by total test time on 2026-12-07: test_faults (211 s: six driver runs, each fault at a
named point), test_megatron_loop (89 s), test_loop (86 s), test_stop_signals (83 s),
test_algorithms (81 s), test_job_submit (71 s: a real head node, two jobs), test_megatron_checkpoint
(70 s), test_weight_group_rebuild (60 s). SLOWEST_FIRST below was ordered from the 2026-12-06
totals and kept: the three slowest files still go first.
"""

import os

# Before Ray is imported anywhere: under `uv run pytest`, Ray would otherwise rebuild the
# project's environment for every worker process (see driver.py).
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

SLOWEST_FIRST = [
    "test_loop.py",
    "test_megatron_loop.py",
    "test_faults.py",
    "test_tool_task.py",
    "test_megatron_checkpoint.py",
    "test_algorithms.py",
    "test_stop_signals.py",
    "test_weight_group_rebuild.py",
    "test_torch_resume.py",
    "test_megatron.py",
    "test_engine.py",
    "test_sglang_engine.py",
    "test_deadlines.py",
    "test_multinode.py",
    "test_weight_sync.py",
    "test_job_submit.py",
    "test_cli.py",
    "test_placement.py",
    "test_partial_rollout.py",
    "test_fp8_tool.py",
    "test_sglang_weight_group.py",
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
