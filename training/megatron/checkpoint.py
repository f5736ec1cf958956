"""Training checkpoints, switched in atomically: megatron-core's torch_dist format for the
Megatron backend, one `torch_state.pt` for the torch backend, in the same save-root layout.

A save root follows Megatron-LM's layout, so its tools can read it:

    root/iter_0000020/                      a complete checkpoint (.metadata, *.distcp, ...)
    root/iter_0000030.tmp/                  a save in progress, or one a crash left: never read
    root/latest_checkpointed_iteration.txt  "20": the newest complete checkpoint

A save is written into `staging_dir(root, step)`, then `commit(root, step)` renames it and
replaces the tracker file with `os.replace`; a crash at any point leaves the previous tracker
pointing at the previous, untouched checkpoint. The staging directory is an ordinary folder:
anything else written into it before `commit` (a trainer-state file) commits with it.

`prune(root, step, keep_last, keep)` deletes older checkpoints once `commit` has switched the
tracker over: each is renamed to `iter_NNNNNNN.deleting` first, so a crash mid-delete leaves
nothing that `latest` or Megatron-LM's tools would read.

Concurrency: `save_torch_dist` and `load_torch_dist` are collectives; every training rank
calls them with the same directory. `commit` runs on one process, after `save_torch_dist`
has returned on every rank, on a file system all ranks share.
"""

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from config.errors import UserError
from models.safetensors_io import replace_directory, sibling

TRACKER_FILE = "latest_checkpointed_iteration.txt"
STAGING_SUFFIX = ".tmp"
DELETING_SUFFIX = ".deleting"
CHECKPOINT_NAME = re.compile(r"iter_(\d{7})")
OPTIMIZER_KEY_PREFIX = "optimizer."
LR_SCHEDULE_KEY = "lr_schedule"
"""Common (unsharded) state of a checkpoint: the learning-rate schedule's step count and
settings (`training.lr_schedule.ScheduleState.state_dict`), saved with the optimizer."""


def save_torch_dist(
    directory: str | Path,
    model: Any,
    optimizer: Any = None,
    lr_schedule: dict[str, Any] | None = None,
) -> None:
    """Save this rank's shards of the model (and optimizer) into `directory` (a collective).

    `model` is a GPTModel or a wrapper of one (megatron-core DDP, Float16Module); `optimizer`
    is what megatron-core's `get_megatron_optimizer` returns; `lr_schedule` (plain numbers,
    the same on every rank) goes with it as common state. The directory is created; a
    staging directory left by a crashed save is emptied first.
    """
    from megatron.core import dist_checkpointing

    _check_writer()
    directory = Path(directory)
    _prepare_directory(directory)
    state = _sharded_state(model, optimizer, loading=False)
    if lr_schedule is not None:
        state[LR_SCHEDULE_KEY] = lr_schedule
    dist_checkpointing.save(state, str(directory))


def _check_writer() -> None:
    # megatron-core's torch_dist writer logs each worker's memory through psutil and fails
    # the whole save, after writing, when psutil was missing at its import: say so up front.
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not filesystem_async.HAVE_PSUTIL:
        raise UserError(
            "saving a torch_dist checkpoint needs psutil (megatron-core's writer uses it): "
            "pip install psutil"
        )


def load_torch_dist(
    directory: str | Path, model: Any, optimizer: Any = None
) -> dict[str, Any] | None:
    """Load a torch_dist checkpoint into this rank's model (and optimizer): a collective.
    With the optimizer, returns the learning-rate schedule state saved with it (None when the
    checkpoint has none: written before schedules were saved, or converted).

    The model loads from a checkpoint saved under any parallel layout (TP, PP, EP, ETP and
    DP may all differ): megatron-core reads each rank's slices of the global tensors. The
    optimizer state is saved in megatron-core's `dp_reshardable` format (Megatron-LM's
    default): load it under the tensor / pipeline / expert layout it was saved at
    (megatron-core reshards this format over data parallelism only; the tests cover the same
    layout). A non-distributed optimizer's state is sharded like the model's weights. To load
    only the weights into a model that has an optimizer, pass `optimizer=None`, then call
    `optimizer.reload_model_params()` so its fp32 main copies follow the loaded weights.
    """

    directory = Path(directory)
    if not is_torch_dist_checkpoint(directory):
        raise UserError(f"{directory} is not a torch_dist checkpoint (no metadata.json)")
    if optimizer is not None and not has_optimizer_state(directory):
        raise UserError(
            f"{directory} holds no optimizer state (a converted Hugging Face checkpoint?); "
            f"load the model only and start the optimizer afresh"
        )
    # No autograd: with fp32 weights the optimizer's main weights are views of the
    # parameters, and loading copies into both in place.
    with torch.no_grad():
        return _load(directory, model, optimizer)


def _load(directory: Path, model: Any, optimizer: Any) -> dict[str, Any] | None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    if optimizer is not None:
        _allocate_optimizer_state(optimizer)
    state = _sharded_state(model, optimizer, loading=True)
    # RAISE_UNEXPECTED: a model tensor the checkpoint lacks is an error named by its key
    # (a checkpoint of another model), while checkpoint entries not asked for (optimizer
    # state when loading weights only) are fine.
    loaded = dist_checkpointing.load(state, str(directory), strict=StrictHandling.RAISE_UNEXPECTED)
    unwrap(model).load_state_dict(loaded["model"])
    if optimizer is None:
        return None
    optimizer.load_state_dict(loaded["optimizer"])
    _restore_step_counts(optimizer)
    return loaded.get(LR_SCHEDULE_KEY)  # common state: loaded whether asked for or not


def _allocate_optimizer_state(optimizer: Any) -> None:
    # megatron-core's DistributedOptimizer builds its sharded state dict from its live state,
    # which torch's Adam allocates only at its first step (Apex / TE Adam allocate it at
    # once). A fresh one therefore takes megatron-core's own zero-gradient warm-up step; the
    # load then overwrites every value it touched (moments, step count, main weights).
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        warm_up = getattr(part, "_init_optimizer_states_with_dummy_values", None)
        if warm_up is not None and not part.optimizer.state:
            warm_up()


def _restore_step_counts(optimizer: Any) -> None:
    # Without Apex / TE, megatron-core's DistributedOptimizer restores the step count into
    # the param groups, but torch's Adam reads (and increments in place) a `step` tensor in
    # each parameter's state, which the load leaves stale or shared between parameters.
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = part.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                step = state.get("step") if state else None
                if torch.is_tensor(step):  # on the GPU for a fused Adam
                    state["step"] = torch.tensor(
                        float(group["step"]), dtype=step.dtype, device=step.device
                    )


def unwrap(model: Any) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (each keeps it as `.module`)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _sharding_metadata() -> dict[str, Any]:
    # Megatron-LM's defaults, so checkpoints interoperate. A fresh dict every call:
    # megatron-core stores process groups into it.
    return {
        "distrib_optim_sharding_type": "dp_reshardable",
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
    }


def _sharded_state(model: Any, optimizer: Any, loading: bool) -> dict[str, Any]:
    metadata = _sharding_metadata()
    model_state = unwrap(model).sharded_state_dict(metadata=metadata)
    state = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=loading, metadata=metadata
        )
    return state


def _prepare_directory(directory: Path) -> None:
    """Rank 0 creates the directory (emptying a stale staging one); the others wait for it."""
    if dist.get_rank() == 0:
        if directory.name.endswith(STAGING_SUFFIX) and directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()


TORCH_STATE_FILE = "torch_state.pt"
"""The torch backend's checkpoint: model and optimizer in one file (rank 0), beside each
rank's `rng_rank<r>.pt`; the staging folder is committed only once every rank has returned."""


def is_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` is one complete checkpoint of either backend."""
    return is_torch_dist_checkpoint(directory) or (Path(directory) / TORCH_STATE_FILE).is_file()


def is_torch_dist_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` is one complete torch_dist checkpoint (metadata.json is its last
    file: megatron-core writes it after every shard)."""
    return (Path(directory) / "metadata.json").is_file()


def has_optimizer_state(directory: str | Path) -> bool:
    """Whether the checkpoint holds optimizer state (read from its metadata, no tensors)."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    # A ChainedOptimizer (dense + expert optimizers) prefixes its parts with "chained_N.".
    return any(
        key.startswith(OPTIMIZER_KEY_PREFIX) or f".{OPTIMIZER_KEY_PREFIX}" in key for key in keys
    )


# The atomic switch-over of a save root.


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def staging_dir(root: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` is written before `commit` makes it the latest."""
    return sibling(checkpoint_dir(root, step), STAGING_SUFFIX)


def commit(root: str | Path, step: int) -> Path:
    """Make the finished staging checkpoint of `step` the latest; return its final path.

    Order matters: the checkpoint is renamed into place first and the tracker replaced last,
    so the tracker only ever names complete checkpoints.
    """
    staged, final = staging_dir(root, step), checkpoint_dir(root, step)
    if not is_checkpoint(staged):
        raise RuntimeError(f"{staged} is not a finished checkpoint; nothing to commit")
    replace_directory(staged, final)
    _write_atomically(Path(root) / TRACKER_FILE, f"{step}\n")
    return final


def _write_atomically(path: Path, text: str) -> None:
    temporary = sibling(path, STAGING_SUFFIX)
    with open(temporary, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    # The rename itself is durable only once the directory entry is flushed.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def latest(root: str | Path) -> Path | None:
    """The checkpoint to resume from: the one the tracker of save root `root` names, or
    `root` itself when it is a checkpoint (a converted one); None when there is none yet."""
    root = Path(root)
    tracker = root / TRACKER_FILE
    if tracker.is_file():
        return _tracked(root, tracker.read_text().strip())
    if is_checkpoint(root):
        return root
    return None


def _tracked(root: Path, entry: str) -> Path:
    # Megatron-LM writes "release" for a checkpoint that is not part of a run.
    if entry == "release":
        path = root / "release"
    elif entry.isdigit():
        path = checkpoint_dir(root, int(entry))
    else:
        raise UserError(f"{root / TRACKER_FILE} holds {entry!r}, not a step number")
    if not is_checkpoint(path):
        raise UserError(f"{root / TRACKER_FILE} names {path}, which is not a complete checkpoint")
    return path


# Deleting old checkpoints (checkpoint.keep_last).


def prune(root: str | Path, step: int, keep_last: int, keep: Path | None = None) -> list[Path]:
    """Delete the older checkpoints of save root `root`, the one of `step` just committed;
    return those deleted.

    Kept: the newest `keep_last` complete checkpoints of steps up to `step` (`step`'s
    included), and `keep` (the one the run started from). Left alone: anything that is not a
    complete `iter_NNNNNNN` folder (a save in progress), a symbolic link, and checkpoints of
    later steps than `step` (another run's, or those of a run resumed from an earlier step,
    which the tracker no longer names). Each is renamed to `iter_NNNNNNN.deleting` before
    it is removed (what a crash mid-delete left is removed here, the next time); a folder that
    cannot be deleted is reported on stderr and the run goes on.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last}: the newest checkpoint is always kept")
    root = Path(root)
    for leftover in root.glob(f"iter_*{DELETING_SUFFIX}"):
        _delete(leftover)
    kept = {_real(keep)} if keep is not None else set()
    older = sorted(_committed(root, step), reverse=True)[keep_last:]
    deleted = []
    for _, path in older:
        if _real(path) in kept:
            continue
        doomed = sibling(path, DELETING_SUFFIX)
        try:
            path.rename(doomed)  # atomic: from here on no reader takes it for a checkpoint
        except OSError as error:
            print(f"sluice: could not delete checkpoint {path}: {error}", file=sys.stderr)
            continue
        deleted.append(path)
        _delete(doomed)
    return deleted


def _committed(root: Path, step: int) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints of `root` up to `step`."""
    found = []
    for path in root.iterdir():
        name = CHECKPOINT_NAME.fullmatch(path.name)
        if name and int(name[1]) <= step and not path.is_symlink() and is_checkpoint(path):
            found.append((int(name[1]), path))
    return found


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _delete(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except OSError as error:
        print(f"sluice: could not delete {path}: {error}; delete it by hand", file=sys.stderr)
