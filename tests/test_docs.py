"""The documentation cannot rot: README.md and docs/*.md are checked against the code.

- docs/configuration.md is what `tools/config_reference.py` generates from `config/schema.py`,
  and docs/architecture.svg (the README's picture) what `tools/architecture_diagram.py` draws.
- Every command of a fenced shell block (bash, sh, shell, console) that only plans or
  describes (`--dry-run`, `--help`) is run from the repository root and must exit 0. Commands
  that train, or need a cluster, a GPU or files the reader supplies, are not run; a command
  behind an environment variable (`RAY_ADDRESS=... uv run ...`) is not matched either.
- Every relative link points to a file that exists, and a `#anchor` to one of its headings.

The commands are spelled `uv run ...` for the reader; here they run under this interpreter
(`uv run driver.py X` as `python driver.py X`), which is the same environment without uv's
start-up. A driver dry run gets a fresh `--logging.output_dir` appended: the dry run checks the
output folder like a real run, and results of an earlier run in the checkout's `outputs/`
would otherwise decide the outcome. The driver's commands run as children forked from one
interpreter that has imported torch and transformers once (tests/forked_driver.py), next
to the tools' commands, each its own process; each test waits for its own command.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tools.config_reference import REGENERATE, render

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
MIN_COMMANDS = 25
"""Commands found when this test was written; fewer means the extraction broke (or commands
were dropped from the docs), not that there is less to check."""
COMMAND_TIMEOUT_S = 180
FRESH = os.environ.get("SLUICE_TEST_DOCS_FRESH") == "1"


@dataclass(frozen=True)
class DocCommand:
    where: str
    """`file:line` of the command's first line, relative to the repository root."""
    text: str
    """The command as the reader would type it, continuation lines joined."""

    def argv(self) -> list[str]:
        """`uv run X.py ...` -> [python, X.py, ...]; `uv run python ...` -> [python, ...]."""
        tokens = shlex.split(self.text)
        if tokens[:2] != ["uv", "run"] or len(tokens) < 3:
            raise ValueError(f"{self.where}: not a `uv run` command: {self.text}")
        program, rest = tokens[2], tokens[3:]
        if program == "python":
            return [sys.executable, *rest]
        if program.endswith(".py"):
            return [sys.executable, program, *rest]
        raise ValueError(
            f"{self.where}: `uv run {program}` has no translation here; extend DocCommand.argv"
        )


def shell_blocks(path: Path) -> list[tuple[int, list[str]]]:
    """(line number of the block's first line, its lines) of every fenced shell block."""
    blocks: list[tuple[int, list[str]]] = []
    block: list[str] | None = None  # the open shell block's lines
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fence = re.match(r"^\s*```\s*([\w-]*)", line)
        if fence and not fenced:
            fenced = True
            if fence.group(1).lower() in SHELL_LANGUAGES:
                block = []
                blocks.append((number + 1, block))
        elif fence:
            fenced, block = False, None
        elif block is not None:
            block.append(line)
    return blocks


def strip_comment(line: str) -> str:
    """The line without a trailing shell comment: a `#` at a word's start, outside quotes
    (a `#` inside a word, as in a URL's fragment, stays)."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def commands_in(path: Path) -> list[DocCommand]:
    """Every command of the file's shell blocks: a leading `$ ` dropped, `\\` continuations
    joined, comments removed."""
    name = path.relative_to(REPO).as_posix()
    found = []
    for first, lines in shell_blocks(path):
        pending, pending_start = "", 0
        for offset, raw in enumerate(lines):
            line = raw.strip()
            if not pending:
                pending_start = first + offset
                line = line.removeprefix("$ ")
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            text = strip_comment(pending + line).strip()
            pending = ""
            if text:
                found.append(DocCommand(f"{name}:{pending_start}", text))
    return found


def runnable(command: DocCommand) -> bool:
    """Only plans and help texts: they start nothing, need no GPU, cluster or user file."""
    words = command.text.split()
    return words[:2] == ["uv", "run"] and ("--dry-run" in words or "--help" in words)


COMMANDS = [c for path in DOCS for c in commands_in(path) if runnable(c)]


def test_enough_commands_are_found():
    assert len(COMMANDS) >= MIN_COMMANDS, [c.where for c in COMMANDS]


def test_the_configuration_reference_is_current():
    page = REPO / "docs" / "configuration.md"
    assert page.is_file(), f"docs/configuration.md is missing; run `{REGENERATE}`"
    assert page.read_text(encoding="utf-8") == render(), (
        f"docs/configuration.md is out of date with config/schema.py; run `{REGENERATE}`"
    )


def test_the_architecture_picture_is_its_sources_output():
    from tools import architecture_diagram

    picture = architecture_diagram.OUTPUT
    assert picture.read_text(encoding="utf-8") == architecture_diagram.render(), (
        "docs/architecture.svg is out of date; run `uv run python -m tools.architecture_diagram`"
    )
    assert "](docs/architecture.svg)" in (REPO / "README.md").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def _argv(command: DocCommand, output_dir: Path) -> list[str]:
    argv = command.argv()
    if argv[1] == "driver.py" and "--dry-run" in argv:
        argv += ["--logging.output_dir", str(output_dir)]
    return argv


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # plan for this machine


def run_fresh(argv: list[str]) -> Outcome:
    done = subprocess.run(
        argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


# Driver commands run as children forked from one interpreter that has paid for the imports
# (tests/forked_driver.py); SLUICE_TEST_DOCS_FRESH=1 runs each as its own process instead.
FORKED_DRIVER = REPO / "tests" / "forked_driver.py"


def run_forked(cases: list[list[str]], work: Path) -> list[Outcome]:
    """Driver commands (argv after `driver.py`), each in a child of one pre-imported process."""
    cases_file, results_file = work / "cases.json", work / "results.json"
    cases_file.write_text(json.dumps(cases))
    subprocess.run(
        [sys.executable, FORKED_DRIVER, cases_file, results_file, str(COMMAND_TIMEOUT_S)],
        cwd=REPO,
        env=_env(),
        check=True,
        timeout=COMMAND_TIMEOUT_S * (len(cases) + 1),
    )
    return [Outcome(**r) for r in json.loads(results_file.read_text())]


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> dict[str, Callable[[], Outcome]]:
    """The selected commands, all started at once; each test waits only for its own. A
    command shown on two pages runs once."""
    selected = [
        item.callspec.params["command"]
        for item in request.session.items
        if item.originalname == "test_documented_command_exits_0"
    ]
    work = tmp_path_factory.mktemp("docs")
    output_dir = work / "outputs"  # a dry run never creates it
    argvs = {c.text: _argv(c, output_dir) for c in selected}
    forked = [] if FRESH else [t for t, argv in argvs.items() if argv[1] == "driver.py"]
    pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1))
    batch = pool.submit(run_forked, [argvs[t][2:] for t in forked], work) if forked else None
    fresh = {t: pool.submit(run_fresh, argv) for t, argv in argvs.items() if t not in forked}

    def outcome_of(text: str) -> Callable[[], Outcome]:
        if text in fresh:
            return fresh[text].result
        return lambda: batch.result()[forked.index(text)]

    yield {c.where: outcome_of(c.text) for c in selected}
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_exits_0(command: DocCommand, outcomes: dict):
    result = outcomes[command.where]()
    assert result.returncode == 0, (
        f"{command.where}: `{command.text}` exited {result.returncode}\n"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def prose_lines(path: Path, blank_code: bool = True) -> list[tuple[int, str]]:
    """The file's lines outside fenced blocks; with `blank_code`, inline code spans blanked (a
    link inside backticks is text, not a link)."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if re.match(r"^\s*```", line):
            fenced = not fenced
        elif not fenced:
            lines.append((number, re.sub(r"`[^`]*`", "``", line) if blank_code else line))
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of the file's headings: lower case, punctuation (code spans' backticks
    included) dropped, spaces to dashes, a repeated heading numbered."""
    seen: dict[str, int] = {}
    for _, line in prose_lines(path, blank_code=False):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen[f"{slug}-{count}"] = 1
    return set(seen)


def relative_links() -> list[tuple[str, Path, str]]:
    """(file:line, target file, anchor or '') of every link that is not a URL."""
    links = []
    for path in DOCS:
        for number, line in prose_lines(path):
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                file, _, anchor = target.partition("#")
                resolved = (path.parent / file).resolve() if file else path
                links.append((f"{path.relative_to(REPO).as_posix()}:{number}", resolved, anchor))
    return links


def test_relative_links_point_to_existing_files_and_headings():
    links = relative_links()
    assert len(links) > 50, "the link extraction found almost nothing"
    broken = []
    for where, target, anchor in links:
        shown = os.path.relpath(target, REPO)
        if not target.exists():
            broken.append(f"{where}: {shown} does not exist")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{where}: {shown} has no heading #{anchor}")
    assert not broken, "\n".join(broken)
