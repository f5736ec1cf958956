"""What process start-up costs, with the environment's bytecode against compiling from source.

Every Ray actor and torchrun rank is a fresh interpreter that imports torch and transformers
before it does any work. `pyproject.toml` has uv compile the installed packages to bytecode at
install (`compile-bytecode`); without that, on a machine that sets PYTHONDONTWRITEBYTECODE (as
CI's does), every such process compiled those packages from source again. This script
measures both in the same run:

- `bytecode`: the interpreter as this environment runs it, which loads the installed `.pyc`
  files (on the GPU machine, `bench/gpu_env.sh`'s bytecode folder);
- `from source`: the same interpreter with PYTHONPYCACHEPREFIX pointing at an empty folder and
  PYTHONDONTWRITEBYTECODE=1, so it finds no bytecode and writes none (what every process did
  before).

For each import below it prints the median CPU seconds (user + system) of `--repeats` fresh
processes and the ratio. `--job` also runs a one-step job of the default recipe (1 trainer,
1 engine) both ways and reports its wall time and the whole machine's busy CPU seconds (from
/proc/stat: run it on an otherwise idle machine).

    uv run python -m bench.bench_startup
    uv run python -m bench.bench_startup --repeats 5 --job
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

IMPORTS = {
    "ray": "import ray",
    "torch": "import torch",
    "transformers' Qwen3-MoE": "from transformers import Qwen3MoeForCausalLM",
    "a training actor's module": "import actors.train_actor",
    "the driver loop": "import actors.loop",
}


def child_cpu_seconds(command: list[str], env: dict[str, str]) -> float:
    """User + system CPU seconds of one child process run to its end."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (Linux)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def environments(empty_cache: str) -> dict[str, dict[str, str]]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    base = {**os.environ, "PYTHONPATH": path, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    source = {**base, "PYTHONPYCACHEPREFIX": empty_cache, "PYTHONDONTWRITEBYTECODE": "1"}
    return {"bytecode": base, "from source": source}


def bench_imports(envs: dict[str, dict[str, str]], repeats: int) -> None:
    print(f"CPU seconds of a fresh interpreter, median of {repeats}:")
    print(f"{'import':28s} {'bytecode':>9s} {'from source':>12s} {'ratio':>6s}")
    for label, statement in IMPORTS.items():
        medians = {}
        for mode, env in envs.items():
            runs = [
                child_cpu_seconds([sys.executable, "-c", statement], env) for _ in range(repeats)
            ]
            medians[mode] = statistics.median(runs)
        fast, slow = medians["bytecode"], medians["from source"]
        print(f"{label:28s} {fast:8.2f}s {slow:11.2f}s {fast / slow:6.2f}")


def bench_job(envs: dict[str, dict[str, str]]) -> None:
    print("\nA one-step job (recipes/tiny.yaml, 1 trainer + 1 engine, local Ray):")
    print(f"{'mode':12s} {'wall':>7s} {'busy CPU':>9s}")
    figures = {}
    for mode, env in envs.items():
        with tempfile.TemporaryDirectory() as out:
            command = [
                sys.executable, "driver.py", "--num_steps", "1", "--train.num_workers", "1",
                "--rollout.num_engines", "1", "--logging.progress_bar", "false",
                "--logging.output_dir", out,
            ]  # fmt: skip
            busy, start = machine_busy_seconds(), time.perf_counter()
            subprocess.run(command, env=env, cwd=REPO, check=True, capture_output=True)
            figures[mode] = (time.perf_counter() - start, machine_busy_seconds() - busy)
        wall, cpu = figures[mode]
        print(f"{mode:12s} {wall:6.1f}s {cpu:8.1f}s")
    (wall_b, cpu_b), (wall_s, cpu_s) = figures["bytecode"], figures["from source"]
    print(f"{'ratio':12s} {wall_b / wall_s:7.2f} {cpu_b / cpu_s:9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per figure")
    parser.add_argument("--job", action="store_true", help="also time a one-step job")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    with tempfile.TemporaryDirectory() as empty_cache:
        envs = environments(empty_cache)
        bench_imports(envs, args.repeats)
        if args.job:
            bench_job(envs)


if __name__ == "__main__":
    main()
