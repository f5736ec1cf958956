"""A run's `metrics.jsonl` as a Markdown table, one row per training step (for RESULTS.md).

    python bench/summarize_run.py OUTPUT_DIR/metrics.jsonl

Columns: loss, reward, train/rollout log-prob mismatch (mean |diff|), the weight version the
engines reported, the step split into rollout / train / sync seconds, the weight-sync
bandwidth, and the largest training rank's peak GPU and host memory. Evaluation lines (no
`train/loss`) are left out.
"""

import json
import sys
from pathlib import Path

COLUMNS = {
    "loss": "train/loss",
    "reward": "rollout/reward_mean",
    "mismatch": "mismatch/logprob_abs_diff_mean",
    "version": "weight_version",
    "rollout s": "time/rollout",
    "train s": "time/train",
    "sync s": "time/sync",
    "sync GB/s": "sync/gb_per_s",
    "GPU peak GB": "memory/train_gpu_peak_gb",
    "host RSS GB": "memory/train_host_rss_gb",
}


def table(lines: list[dict]) -> str:
    rows = ["| step | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for line in lines:
        if "train/loss" not in line:
            continue
        cells = [_fmt(line.get(key)) for key in COLUMNS.values()]
        rows.append(f"| {line['step']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/summarize_run.py OUTPUT_DIR/metrics.jsonl")
    path = Path(sys.argv[1])
    lines = [json.loads(text) for text in path.read_text().splitlines() if text.strip()]
    print(table(lines))


if __name__ == "__main__":
    main()
