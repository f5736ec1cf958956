"""The run's output folder (`logging.output_dir`): one run's results, never two runs mixed.

`check_writable_folder` and `check_not_another_run` run in the pass before any actor starts
(and in the dry run): the folder must be a folder, and must not hold another run's results
unless the user asked to replace them (`logging.overwrite`) or this run resumes a checkpoint
(its steps continue that run's).

Nothing is written into the folder until the run has its first metrics to show
(`MetricsWriter` calls `begin_run`): a run that fails before that leaves the folder as it
found it, except for `error.log`. Only then are a replaced run's files removed, so a run that
never got going loses nothing of the one it was to replace.
"""

import os
import shutil
from pathlib import Path

from config.errors import UserError

RESULT_FILES = ("metrics.jsonl", "summary.json")
"""Files whose presence (non-empty) means the folder holds a run's results."""
ERROR_LOG = "error.log"
RUN_FILES = ("metrics.jsonl", "summary.json", "config.json", "tracking.json", ERROR_LOG)
RUN_DIRS = ("tensorboard", "wandb", "mlruns", "final_model", "stuck")


def check_not_another_run(path: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse an output folder that holds another run's results (`check_writable_folder`
    checks that it can be written at all)."""
    if overwrite or resuming or not path.is_dir():
        return
    held = [name for name in RESULT_FILES if _non_empty(path / name)]
    if held:
        raise UserError(
            f"logging.output_dir={path} holds another run's results ({', '.join(held)}); "
            f"write this run elsewhere (--logging.output_dir DIR), replace that run "
            f"(--logging.overwrite true), or resume it from its checkpoint (--load DIR)"
        )


def check_writable_folder(path: Path, key: str, flag: str) -> None:
    """Refuse a folder to be written (`key` = `path`) that is a file, lies inside a file, or
    cannot be written; it need not exist yet."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is" if existing == path else f"is inside {existing}, which is"
        raise UserError(
            f"{key}={path} {where} a file, not a folder; choose another folder with {flag}"
        )
    if not os.access(existing, os.W_OK):
        raise UserError(
            f"{key}={path}: {existing} is not writable; choose a folder you can write with {flag}"
        )


def begin_run(path: Path, replace: bool) -> None:
    """Make the folder; with `replace`, remove the previous run's files first (only those a run
    writes: anything else the user keeps there stays)."""
    path.mkdir(parents=True, exist_ok=True)
    if not replace:
        return
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(path / name, ignore_errors=True)


def write_error_log(path: Path, text: str) -> Path | None:
    """`<output_dir>/error.log` with `text` (a traceback); None if it cannot be written (the
    error being reported may be that very folder)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        log = path / ERROR_LOG
        log.write_text(text)
    except OSError:
        return None
    return log


def _non_empty(file: Path) -> bool:
    return file.is_file() and file.stat().st_size > 0
