"""Where each step's numbers go besides metrics.jsonl (`logging.backends`): TensorBoard,
Weights & Biases, MLflow. Each gets the same keys at the same steps (`MetricsWriter.write`).

wandb and mlflow are imported only when a run names them, and only by the driver: importing
either costs seconds that no Ray actor's start-up should pay.

Resuming: a run that resumes from a checkpoint into the same output folder continues the same
W&B run (same id, `resume="allow"`) and the same MLflow run; their ids are kept in
`<output_dir>/tracking.json`. Neither service can forget logged steps, so steps a resumed
(or restarted) run repeats appear there twice; TensorBoard drops the earlier ones."""

import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from config.schema import LoggingConfig

RUN_IDS_FILE = "tracking.json"
"""{"wandb": run id, "mlflow": run id}: what a resumed run continues."""

_MLFLOW_REFUSED = re.compile(r"[^/\w.\- :]")

STEP_KEY = "step"
"""W&B's x-axis for every metric: Sluice's RL step (W&B's own `_step` only counts calls)."""


class Backend(Protocol):
    """One place the scalars go. `open` comes before the first `write`."""

    def open(self, resume_step: int | None) -> None:
        """Start (None) or continue a run whose steps after `resume_step` are to be redone."""

    def write(self, step: int, scalars: dict[str, float]) -> None: ...

    def rewind(self, step: int) -> None:
        """The run goes back to `step` and repeats the steps after it."""

    def close(self) -> None: ...


class TensorBoardBackend:
    """Event files in `<output_dir>/tensorboard`; a rewind discards the later events."""

    def __init__(self, output_dir: Path):
        self.folder = output_dir / "tensorboard"
        self.writer = None

    def open(self, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=purge)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def rewind(self, step: int) -> None:
        self.close()
        self.open(resume_step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbBackend:
    """One W&B run per Sluice run, resumed with it. Every metric is charted against `step`."""

    def __init__(self, settings: "LoggingConfig", output_dir: Path, config: dict[str, Any]):
        self.settings = settings
        self.output_dir = output_dir
        self.config = config
        self.run = None

    def open(self, resume_step: int | None) -> None:
        import wandb

        s = self.settings
        folder = Path(s.wandb_dir or self.output_dir)
        folder.mkdir(parents=True, exist_ok=True)  # W&B falls back to a temp folder otherwise
        kept = _run_id(self.output_dir, "wandb", resume_step)
        run_id = s.wandb_run_id or kept or secrets.token_hex(4)  # W&B's ids: 8 characters
        self.run = wandb.init(
            project=s.wandb_project,
            entity=s.wandb_team or None,
            group=s.wandb_group or None,
            id=run_id,
            resume="allow",
            name=self.output_dir.resolve().name,
            dir=str(folder),
            mode=s.wandb_mode or None,
            config=self.config,
            settings=wandb.Settings(base_url=s.wandb_host) if s.wandb_host else None,
        )
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)
        _keep_run_id(self.output_dir, "wandb", run_id)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({STEP_KEY: step, **scalars})

    def rewind(self, step: int) -> None:
        """W&B keeps what it has; the repeated steps are logged again after it."""

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MlflowBackend:
    """One MLflow run per Sluice run, resumed with it, through `MlflowClient` (no global
    active run: the driver may hold other MLflow state of the user's)."""

    def __init__(self, settings: "LoggingConfig", output_dir: Path, config_text: str):
        self.settings = settings
        self.output_dir = output_dir
        self.config_text = config_text
        self.client = None
        self.run_id = None

    @property
    def tracking_uri(self) -> str:
        default = (self.output_dir / "mlruns").resolve().as_uri()
        return self.settings.mlflow_tracking_uri or default

    def open(self, resume_step: int | None) -> None:
        if self.tracking_uri.startswith("file:"):
            # MLflow 3 refuses its file store unless opted in; a file: URI (the default, or the
            # user's) is that choice. A user's MLFLOW_ALLOW_FILE_STORE=false still wins.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.run_id = _run_id(self.output_dir, "mlflow", resume_step)
        if self.run_id is None:
            self.run_id = self._new_run()
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        _keep_run_id(self.output_dir, "mlflow", self.run_id)

    def _new_run(self) -> str:
        name = self.settings.mlflow_experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(name)
        )
        run = self.client.create_run(experiment_id, run_name=self.output_dir.resolve().name)
        if self.config_text:
            self.client.log_text(run.info.run_id, self.config_text, "config.json")
        return run.info.run_id

    def write(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), float(v), now, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def rewind(self, step: int) -> None:
        """MLflow keeps what it has; the repeated steps are logged again after it."""

    def close(self) -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id)
            self.client = None


def mlflow_key(key: str) -> str:
    """`key` as MLflow accepts it (letters, digits, `_ - . / : space`): `eval/aime/pass@16`
    becomes `eval/aime/pass_at_16`, any other character `_`."""
    return _MLFLOW_REFUSED.sub("_", key.replace("@", "_at_"))


def make_backends(
    settings: "LoggingConfig", output_dir: Path, config_text: str = ""
) -> list[Backend]:
    """The backends `settings.backends` names, in its order (none is opened yet)."""
    config = json.loads(config_text) if config_text else {}
    made = {
        "tensorboard": lambda: TensorBoardBackend(output_dir),
        "wandb": lambda: WandbBackend(settings, output_dir, config),
        "mlflow": lambda: MlflowBackend(settings, output_dir, config_text),
    }
    return [made[name]() for name in settings.backends]


def _run_id(output_dir: Path, backend: str, resume_step: int | None) -> str | None:
    """The run id a resumed run continues (None for a fresh run, or none kept)."""
    path = output_dir / RUN_IDS_FILE
    if resume_step is None or not path.is_file():
        return None
    return json.loads(path.read_text()).get(backend)


def _keep_run_id(output_dir: Path, backend: str, run_id: str) -> None:
    path = output_dir / RUN_IDS_FILE
    ids = json.loads(path.read_text()) if path.is_file() else {}
    ids[backend] = run_id
    staging = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
    staging.write_text(json.dumps(ids, indent=2))
    staging.replace(path)
