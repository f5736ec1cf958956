"""Per-step metrics: one JSONL line per step, and its numbers to each of `logging.backends`
(TensorBoard, W&B, MLflow: tracking/backends.py), written by the driver only."""

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from config.schema import loss_settings_line
from tracking.backends import Backend, TensorBoardBackend
from tracking.run_dir import begin_run

if TYPE_CHECKING:
    from config.schema import SluiceConfig


class MetricsWriter:
    """Appends `{"step": n, ...}` to `metrics.jsonl` and mirrors every finite number to each
    backend (TensorBoard alone unless `backends` says otherwise).

    The folder is only touched at the first `write` (`tracking.run_dir`): then the previous
    run's files go (`replace`), or a resumed run's metrics are cut back to the checkpoint's
    step (`resume_step`), and `config.json` (`config_text`) is written beside them."""

    def __init__(
        self,
        output_dir: Path,
        config_text: str = "",
        replace: bool = False,
        resume_step: int | None = None,
        backends: list[Backend] | None = None,
    ):
        self.output_dir = output_dir
        self.config_text = config_text
        self.replace = replace
        self.resume_step = resume_step
        self.started = False
        """Whether the run has written anything into its folder."""
        self.jsonl = None
        self.backends = [TensorBoardBackend(output_dir)] if backends is None else backends

    def begin(self) -> None:
        """Take the folder for this run (done by the first `write`; idempotent)."""
        if self.started:
            return
        self.started = True
        begin_run(self.output_dir, self.replace)
        if self.config_text:
            (self.output_dir / "config.json").write_text(self.config_text)
        if self.resume_step is not None:
            self._cut_jsonl(self.resume_step)
        self.jsonl = (self.output_dir / "metrics.jsonl").open("a")
        for backend in self.backends:
            backend.open(self.resume_step)

    def rewind(self, step: int) -> None:
        """Forget the steps after `step` (the run went back to a checkpoint and repeats them):
        metrics.jsonl keeps its lines up to `step`, TensorBoard discards later events (W&B and
        MLflow cannot: tracking/backends.py)."""
        if not self.started:  # nothing written yet: the same cut, at the first write
            self.resume_step = step
            return
        self.jsonl.close()
        self._cut_jsonl(step)
        self.jsonl = (self.output_dir / "metrics.jsonl").open("a")
        for backend in self.backends:
            backend.rewind(step)

    def _cut_jsonl(self, step: int) -> None:
        path = self.output_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        staging = path.with_suffix(".jsonl.tmp")
        staging.write_text("".join(f"{line}\n" for line in kept))
        staging.replace(path)  # never a half-written metrics file

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.begin()
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        scalars = {
            key: value
            for key, value in metrics.items()
            if isinstance(value, int | float) and math.isfinite(value)
        }
        for backend in self.backends:
            backend.write(step, scalars)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
            for backend in self.backends:
                backend.close()


def start_line(config: "SluiceConfig") -> str:
    """What a run is about to do and where it writes: the job log's first line, printed before
    Ray and the actors start (a minute on a small machine, which would otherwise be silent).
    A GSPO run gets a second line: its clip range and aggregation, GSPO's or set otherwise."""
    t, r = config.train, config.rollout
    line = (
        f"sluice: {config.num_steps} steps of {config.algorithm.loss.upper()} on "
        f"{config.model.hf_checkpoint} with {config.data.prompt_data}; {t.num_workers} "
        f"{t.backend} trainer(s), {r.num_engines} {r.engine} engine(s); writing to "
        f"{config.logging.output_dir} (metrics.jsonl, tensorboard/, summary.json); starting Ray "
        f"and the actors..."
    )
    loss = loss_settings_line(config.algorithm)
    return line if loss is None else f"{line}\nsluice: {loss}"


def step_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """The one line per step that the job log shows (with TIS on: its clip fraction too)."""
    tis = metrics.get("mismatch/tis_clip_fraction")
    return (
        f"step {step}/{total} reward {metrics['rollout/reward_mean']:.3f} "
        f"acc {metrics['rollout/accuracy']:.3f} loss {metrics['train/loss']:+.4f} "
        f"|dlogp| {metrics['mismatch/logprob_abs_diff_mean']:.2e} "
        + (f"tis-clip {tis:.2e} " if tis is not None else "")
        + f"time rollout {metrics['time/rollout']:.2f}s train {metrics['time/train']:.2f}s "
        f"sync {metrics['time/sync']:.2f}s"
    )
