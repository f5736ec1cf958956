"""Every measured figure that README.md and docs/*.md quote is one that bench/RESULTS.md has.

bench/RESULTS.md is where measurements live, each with its card, date and command; the docs
only quote it. A figure here is a number, or a range `A-B`, written before one of the units
that measurements come in: `ms`, `s`, `GB/s`, `MB/s`, `TFLOP/s`, `tokens/s`, `GiB`, `%` and
`x` (a ratio: `1.07 x`, `2.5x`; not a product such as `2 x H100`, `64 x 1024` or
`3 x p5.48xlarge`). Unitless figures (accuracies, log-prob mismatches) and sizes in GB / MB /
MiB (mostly configured or computed: a 200 MB batch, 512 MiB buckets) are not checked.

Each figure must occur in bench/RESULTS.md with the same unit, compared as number and unit
with the space between them and thousands commas dropped (`27 %` is `27%`, `1,873` is
`1873`). A range must occur as that range: its endpoints elsewhere are not enough, and a
rounded form (`33-35 %` for 33.3 % and 34.7 %) fails. Where a doc quotes a measurement in a
form the RESULTS table holds only as a bare cell, RESULTS.md's text says it in that form next
to the table (e.g. "1.07 x the tokens/s"). Figures that are not measurements (timeouts,
intervals, settings, a worked example, a test's own output) are listed in NOT_MEASUREMENTS,
each by the phrase around it in its file and grouped under the reason; an entry whose phrase
is gone from its file fails too, so the list cannot outlive what it excuses.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_NUMBER = r"\d[\d,]*(?:\.\d+)?"
FIGURE = re.compile(
    # not inside a word, a version (0.5.23), a power (4096^3), a path or a larger range
    rf"(?<![\w.^/-])(?P<number>{_NUMBER}(?:-{_NUMBER})?)\s?"
    # longer units first; `x` only as a ratio: not followed by a number, a capital (2 x H100)
    # or an instance type (3 x p5.48xlarge)
    r"(?P<unit>tokens/s|TFLOP/s|GB/s|MB/s|GiB|ms|s|%|x(?!\s*(?:\d|[A-Z]|[a-z]\d)))"
    r"(?![\w/])"
)

MIN_FIGURES = 70
"""Figures checked in the docs when this test was written (90); far fewer means the extraction
broke, and the test would pass on nothing."""

NOT_MEASUREMENTS: dict[str, list[tuple[str, str]]] = {
    "a timeout, interval or bound that the code or config sets (its default), not a measurement": [
        ("docs/checkpoints.md", "three signals within 5 s"),
        ("docs/faults.md", "A third stop signal within 5 s"),
        ("docs/faults.md", "3 stop signals within 5 s"),
        (
            "docs/faults.md",
            "2 x 3600 + 3600 + 1800 s), a save (3600 s) and the actors' shutdown (60 s)",
        ),
        ("docs/faults.md", "timeouts.rollout_s=3600 s"),
        ("docs/faults.md", "once the flag is read, within 0.1 s"),
        ("docs/faults.md", "`rollout.reward_timeout_s` (60 s)"),
        ("docs/faults.md", "Ray's cancel flag is read every 0.1 s"),
        ("docs/data-and-rewards.md", "`rollout.reward_timeout_s` (60 s)"),
        ("docs/data-and-rewards.md", "rollout.reward_timeout_s=60 s"),
        ("docs/data-and-rewards.md", "scoring 0.0 after 5 s"),
        ("docs/sglang.md", "probed again (`/health`) every 30 s"),
        ("docs/sglang.md", "each allowed 25 s"),
        ("docs/sglang.md", "Ray's cancel flag every 0.1 s"),
        ("docs/cluster.md", "16260 s is what"),
    ],
    "a setting of a manifest, not a measurement": [
        ("docs/cluster.md", "a 256 GiB shared-memory `/dev/shm`"),
    ],
    "how long a test makes a reward stall, not a measurement": [
        ("docs/faults.md", "while a reward stalls for 15 s"),
    ],
    "a worked example of the arithmetic, not a measurement": [
        ("docs/algorithms.md", "every token is 2% likelier"),
    ],
    "printed by the CPU test the sentence names (`pytest tests/test_fp8.py -s`), not a benchmark": [
        ("docs/fp8.md", "max 0.0357 x amax"),
        ("docs/fp8.md", "mean 0.0048 x amax"),
        ("docs/fp8.md", "0.0044 x amax"),
        ("docs/fp8.md", "relative Frobenius error 2.7 %"),
    ],
    "the test suite's own time, which docs/tests.md records from CI runs, not a benchmark": [
        ("docs/tests.md", "added 340 s of test time"),
    ],
}


@dataclass(frozen=True)
class Figure:
    where: str
    """`file:line`, relative to the repository root."""
    text: str
    """As written, e.g. `28-31 GB/s`."""
    key: str
    """Number and unit without the space and thousands commas, e.g. `28-31GB/s`."""
    span: tuple[int, int]


def figures(text: str, name: str = "") -> list[Figure]:
    found = []
    for match in FIGURE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        key = match["number"].replace(",", "") + match["unit"]
        found.append(Figure(f"{name}:{line}", match[0], key, match.span()))
    return found


def phrase_spans(text: str, phrase: str) -> list[tuple[int, int]]:
    """Where `phrase` occurs in `text`, a line break matching any space of it."""
    pattern = r"\s+".join(re.escape(word) for word in phrase.split())
    return [m.span() for m in re.finditer(pattern, text)]


def excused_spans(name: str, text: str) -> list[tuple[int, int]]:
    spans = []
    for entries in NOT_MEASUREMENTS.values():
        for file, phrase in entries:
            if file == name:
                spans += phrase_spans(text, phrase)
    return spans


def read_docs() -> dict[str, str]:
    return {str(path.relative_to(REPO)): path.read_text() for path in DOCS}


def unsourced(results: str, docs: dict[str, str]) -> tuple[list[Figure], int]:
    """The docs' figures that `results` lacks, and how many figures were checked."""
    known = {figure.key for figure in figures(results)}
    missing, checked = [], 0
    for name, text in docs.items():
        excused = excused_spans(name, text)
        for figure in figures(text, name):
            start, end = figure.span
            if any(a <= start and end <= b for a, b in excused):
                continue
            checked += 1
            if figure.key not in known:
                missing.append(figure)
    return missing, checked


def test_every_doc_figure_is_in_results():
    missing, checked = unsourced(RESULTS.read_text(), read_docs())
    assert checked >= MIN_FIGURES, f"only {checked} figures found in the docs: extraction broke?"
    assert not missing, (
        "figures that bench/RESULTS.md does not have (quote it, or fix the doc):\n"
        + "\n".join(f"  {figure.where}: {figure.text}" for figure in missing)
    )


def test_a_figure_changed_in_a_doc_fails():
    """The check is not vacuous: a doc figure edited to one RESULTS.md lacks is reported, and
    so is a measurement rounded into a range (33.3 % and 34.7 % as `33-35 %`)."""
    docs = read_docs()
    page = "docs/benchmarks.md"
    assert "(28-31 GB/s)" in docs[page] and "33.3 % and 34.7 % MFU" in docs[page]
    docs[page] = docs[page].replace("(28-31 GB/s)", "(28-33 GB/s)")
    docs[page] = docs[page].replace("33.3 % and 34.7 % MFU", "33-35 % MFU")
    missing, _ = unsourced(RESULTS.read_text(), docs)
    assert sorted(figure.text for figure in missing) == ["28-33 GB/s", "33-35 %"], missing


@pytest.mark.parametrize(
    ("text", "keys"),
    [
        ("0.089-0.100 s (28-31 GB/s)", ["0.089-0.100s", "28-31GB/s"]),
        ("27 % of 220 ms, then 27%", ["27%", "220ms", "27%"]),
        ("1.07x tokens/s, 2.5 x a plain copy, 6,872 tokens/s", ["1.07x", "2.5x", "6872tokens/s"]),
        ("23.3 GiB at 739.6 TFLOP/s", ["23.3GiB", "739.6TFLOP/s"]),
        # products, versions, powers, words: none is a figure
        ("2 x H100, 64 x 1024 tokens, 3 x p5.48xlarge, sglang 0.5.23, 8192^3, 5 steps", []),
    ],
)
def test_what_counts_as_a_figure(text, keys):
    assert [figure.key for figure in figures(text)] == keys


def test_every_excuse_is_still_used():
    """Each NOT_MEASUREMENTS phrase is in its file and holds a figure, or it must go."""
    stale = []
    for entries in NOT_MEASUREMENTS.values():
        for file, phrase in entries:
            text = (REPO / file).read_text()
            spans = phrase_spans(text, phrase)
            holds = any(a <= f.span[0] and f.span[1] <= b for a, b in spans for f in figures(text))
            if not holds:
                stale.append(f"{file}: {phrase!r}")
    assert not stale, (
        "NOT_MEASUREMENTS entries whose phrase (with a figure) is gone:\n" + "\n".join(stale)
    )
