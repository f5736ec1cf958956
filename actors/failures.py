"""A failed run told in one line: what failed and where; the whole story in error.log.

Errors raised inside actors reach the driver wrapped by Ray (`RayTaskError`, whose text is the
remote traceback, often with chained causes); a dead actor arrives as a many-line
`RayActorError`. The command line prints one `error:` line instead, and writes the full
traceback to `<output_dir>/error.log` for those who want it. A user's mistake (`UserError`,
raised here or in an actor) exits 2; anything else exits 1.
"""

import traceback
from dataclasses import dataclass
from pathlib import Path

from ray.exceptions import RayError, RayTaskError

from config.errors import UserError
from tracking.run_dir import write_error_log


@dataclass(frozen=True)
class Failure:
    line: str
    """The message for `error: ...`, one line."""
    exit_code: int


def report(error: BaseException, output_dir: Path | None) -> Failure:
    """The one-line account of `error`; errors from a running run (those Ray carried from an
    actor, and unexpected ones) also get their traceback written to `output_dir`/error.log."""
    cause = error.cause if isinstance(error, RayTaskError) else error
    if isinstance(error, UserError) and not isinstance(error, RayError):
        return Failure(str(error), 2)  # found before the run started: the line says it all
    if isinstance(cause, UserError):
        line, code = str(cause), 2
    elif isinstance(error, RayTaskError):
        line, code = f"{_first_line(cause)} (in {error.function_name})", 1
    else:  # a dead actor (Ray's message runs over many lines), a phase timeout, a bug
        line, code = _first_line(error), 1
    log = (
        write_error_log(output_dir, "".join(traceback.format_exception(error)))
        if output_dir
        else None
    )
    if log is not None:
        line += f" (traceback in {log})"
    return Failure(" ".join(line.split("\n")), code)


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0].strip()}" if lines else type(error).__name__
