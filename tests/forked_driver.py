"""Runs many `driver.py` command lines cheaply: used by tests/test_cli.py and tests/test_docs.py.

Once its arguments parse, `driver.py` imports torch, transformers and Ray (10-20 s of CPU on a
busy 2-core machine), so a fresh `python driver.py` per case would cost minutes. This script
pays for those imports once, then forks a child per case: the child runs `driver.py` as
`__main__` with its own argv, stdout, stderr and exit status, as `python driver.py ...` does
once its imports are done.

    python tests/forked_driver.py CASES.json RESULTS.json TIMEOUT_S     (from the repository root)

CASES.json: a list of argv lists (after `driver.py`); RESULTS.json gets, per case,
{"returncode", "stdout", "stderr"}. A case running past TIMEOUT_S is killed (-9).
"""

import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The imports leave idle threads (torch's); a child runs only the driver's own code, so
# Python's warning about fork() in a multi-threaded process is noise here.
warnings.filterwarnings("ignore", r"This process .* is multi-threaded", DeprecationWarning)

import actors.loop  # noqa: E402  (the expensive imports, inherited by every child)
import actors.preflight  # noqa: E402, F401
import driver  # noqa: E402, F401
import models.tiny  # noqa: E402, F401  (transformers: a Megatron case reads the tiny config)


def run_child(argv: list[str]) -> None:
    os.setsid()
    sys.argv = ["driver.py", *argv]
    code = 1
    try:
        runpy.run_path("driver.py", run_name="__main__")
        code = 0
    except SystemExit as exit:  # what the interpreter does with sys.exit(x)
        if exit.code is None or isinstance(exit.code, int):
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_case(argv: list[str], timeout: float) -> dict:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            run_child(argv)
        deadline = time.monotonic() + timeout
        while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                waited = os.waitpid(pid, 0)
                break
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        return {
            "returncode": os.waitstatus_to_exitcode(waited[1]),
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
        }


if __name__ == "__main__":
    cases_file, results_file, timeout_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
    cases = json.loads(Path(cases_file).read_text())
    results = [run_case(argv, timeout_s) for argv in cases]
    Path(results_file).write_text(json.dumps(results))
