"""`checkpoint.keep_last`: which checkpoints of a save root `prune` deletes, on the file system
(the driver calls it after each commit: tests/test_trainer_restart.py runs that path)."""

from pathlib import Path

import pytest

from actors.preflight import checkpoint_to_load
from config import UserError, load_config
from training.megatron.checkpoint import (
    TORCH_STATE_FILE,
    TRACKER_FILE,
    checkpoint_dir,
    commit,
    latest,
    prune,
    staging_dir,
)


def save(root: Path, step: int) -> Path:
    """A committed checkpoint of `step`, as a torch-backend save leaves it."""
    staging = staging_dir(root, step)
    staging.mkdir(parents=True)
    (staging / TORCH_STATE_FILE).write_text(f"step {step}")
    return commit(root, step)


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_the_newest_are_kept_and_the_older_deleted(tmp_path):
    for step in (2, 4, 6):
        save(tmp_path, step)
    assert prune(tmp_path, 6, keep_last=3) == []
    save(tmp_path, 8)
    assert prune(tmp_path, 8, keep_last=2) == [
        checkpoint_dir(tmp_path, 4),
        checkpoint_dir(tmp_path, 2),
    ]
    assert names(tmp_path) == ["iter_0000006", "iter_0000008", TRACKER_FILE]
    assert latest(tmp_path) == checkpoint_dir(tmp_path, 8)
    assert prune(tmp_path, 8, keep_last=1) == [checkpoint_dir(tmp_path, 6)]
    assert latest(tmp_path) == checkpoint_dir(tmp_path, 8)  # the newest is never deleted


def test_the_checkpoint_the_run_started_from_is_never_deleted(tmp_path):
    for step in (2, 4, 6, 8):
        save(tmp_path, step)
    started_from = checkpoint_dir(tmp_path, 2)
    assert prune(tmp_path, 8, keep_last=1, keep=started_from) == [
        checkpoint_dir(tmp_path, 6),
        checkpoint_dir(tmp_path, 4),
    ]
    assert names(tmp_path) == ["iter_0000002", "iter_0000008", TRACKER_FILE]


def test_later_steps_saves_in_progress_and_links_are_left_alone(tmp_path):
    for step in (2, 4, 9):  # step 9: another run's, or a future this run was resumed before
        save(tmp_path, step)
    save(tmp_path, 6)  # the latest now (a run resumed from step 4 saved step 6)
    (checkpoint_dir(tmp_path, 1)).mkdir()  # not a complete checkpoint: not known to be ours
    staging_dir(tmp_path, 8).mkdir()  # a save in progress
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    save(elsewhere, 3)
    checkpoint_dir(tmp_path, 3).symlink_to(checkpoint_dir(elsewhere, 3))
    assert prune(tmp_path, 6, keep_last=1) == [
        checkpoint_dir(tmp_path, 4),
        checkpoint_dir(tmp_path, 2),
    ]
    assert names(tmp_path) == [
        "iter_0000001", "iter_0000003", "iter_0000006", "iter_0000008.tmp", "iter_0000009",
        TRACKER_FILE,
    ]  # fmt: skip
    assert names(checkpoint_dir(elsewhere, 3)) == [TORCH_STATE_FILE]


def test_a_crash_mid_delete_leaves_the_latest_loadable_and_the_rest_is_deleted_next_time(tmp_path):
    """What `prune` leaves at any point of a crash: each checkpoint is renamed to
    `iter_NNNNNNN.deleting` before any file of it is removed, and the tracker is not touched."""
    for step in (2, 4, 6):
        save(tmp_path, step)
    checkpoint_dir(tmp_path, 2).rename(tmp_path / "iter_0000002.deleting")  # renamed, then
    (tmp_path / "iter_0000002.deleting" / TORCH_STATE_FILE).unlink()  # partly deleted: a crash
    assert latest(tmp_path) == checkpoint_dir(tmp_path, 6)
    assert checkpoint_to_load(str(tmp_path)) == checkpoint_dir(tmp_path, 6)  # what --load reads
    assert prune(tmp_path, 6, keep_last=2) == []
    assert names(tmp_path) == ["iter_0000004", "iter_0000006", TRACKER_FILE]


def test_keep_last_zero_is_not_pruning(tmp_path):
    save(tmp_path, 2)
    with pytest.raises(ValueError, match="the newest checkpoint is always kept"):
        prune(tmp_path, 2, keep_last=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"checkpoint.keep_last": "-1", "checkpoint.save": "ckpt"}, r"keep_last=-1 must be >= 0"),
        ({"checkpoint.keep_last": "2"}, r"keep_last=2 needs checkpoint.save \(--save DIR\)"),
    ],
)
def test_keep_last_is_validated(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_keep_last_defaults_to_keeping_every_checkpoint():
    assert load_config(None, {"checkpoint.save": "ckpt"}).checkpoint.keep_last == 0
