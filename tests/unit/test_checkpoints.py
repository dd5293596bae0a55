"""Checkpoint verification, pruning and the `--resume` plan on a run directory laid out as the driver and the
learners write it (small files, with a marker written by the real `manifest`; the real functions)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lightning_ray.checkpoints import (
    CHECKPOINT_MARKER,
    ENGINE_DIR,
    STREAM_GROUPS,
    STREAM_PARTIAL,
    CheckpointWriteError,
    IncompleteCheckpoint,
    ResumeError,
    checkpoint_problem,
    complete_checkpoints,
    latest_checkpoint,
    manifest,
    prune_checkpoints,
    read_marker,
    resume_plan,
    writing_checkpoint,
)

ENGINE_FILE = Path(ENGINE_DIR) / "engine" / "mp_rank_00_model_states.pt"
POOL = {"epoch": 1, "cursor": 6, "num_tasks": 12}


def fake_checkpoint(run_dir: Path, step: int, complete: bool = True, groups: int = 2) -> Path:
    """A checkpoint folder: engine state, weights, config, the stream's groups; the marker lists them."""
    path = run_dir / "checkpoints" / f"step-{step:06d}"
    (path / ENGINE_FILE).parent.mkdir(parents=True)
    (path / ENGINE_FILE).write_bytes(b"o" * 64)
    (path / "model.safetensors").write_bytes(b"w" * 8)
    (path / "config.json").write_text("{}")
    (path / STREAM_GROUPS).parent.mkdir()
    (path / STREAM_GROUPS).write_text(json.dumps([[{"rollout_id": f"r{i}"}] for i in range(groups)]))
    (path / STREAM_PARTIAL).write_text(
        json.dumps([[{"rollout_id": "p0"}]])
    )  # a running group's finished part
    if complete:
        extra = {"step": step, "pool": POOL, "in_flight": ["t7", "t8", "t9"]}
        (path / CHECKPOINT_MARKER).write_text(json.dumps({"extra": extra, "files": manifest(path)}))
    return path


def run_dir_with_config(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("trainer: {}\n")
    return run_dir


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` mounted at `path` (root only), so a test can fill a disk for real."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def fill(folder: Path) -> Path:
    """Write a file until the filesystem is full; returns it (delete it to free the space)."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while f.write(b"\0" * (1 << 16)):
                pass
        except OSError:
            pass
    return filler


def is_whole(path: Path) -> bool:
    return checkpoint_problem(path) is None and (path / ENGINE_DIR).is_dir()


def is_weights_only(path: Path) -> bool:
    return (
        not (path / CHECKPOINT_MARKER).exists()
        and not (path / ENGINE_DIR).exists()
        and (path / "model.safetensors").is_file()
        and (path / "config.json").is_file()
    )


# ------------------------------------------------------------------------------------- verification


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: (p / CHECKPOINT_MARKER).unlink(), f"no {CHECKPOINT_MARKER}"),
        (lambda p: (p / CHECKPOINT_MARKER).write_text('{"extra": {"step": 1}, "fi'), "unreadable"),
        (lambda p: (p / CHECKPOINT_MARKER).write_text('{"extra": {"step": 1}}'), "lists no files"),
        (lambda p: (p / ENGINE_FILE).write_bytes(b"o" * 10), "mp_rank_00_model_states.pt has 10 bytes"),
        (lambda p: (p / "model.safetensors").unlink(), "model.safetensors is missing"),
        (
            lambda p: (p / STREAM_GROUPS).write_text((p / STREAM_GROUPS).read_text().replace("r0", "r9")),
            "stream/groups.json does not match its checksum",
        ),
    ],
    ids=["no-marker", "marker-cut", "old-marker", "file-truncated", "file-missing", "same-size-corrupt"],
)
def test_a_damaged_checkpoint_is_skipped_with_its_reason(tmp_path, damage, reason):
    older, newer = fake_checkpoint(tmp_path, 1), fake_checkpoint(tmp_path, 2)
    assert complete_checkpoints(tmp_path) == [older, newer]
    damage(newer)
    assert reason in checkpoint_problem(newer)
    assert complete_checkpoints(tmp_path) == [older] and latest_checkpoint(tmp_path) == older
    with pytest.raises(IncompleteCheckpoint, match=f"{newer} is not a complete checkpoint"):
        read_marker(newer)
    assert read_marker(older)["extra"]["step"] == 1


# ------------------------------------------------------------------------------------- pruning


def test_newest_stay_whole_older_keep_their_weights(tmp_path):
    s5, s10, s15 = (fake_checkpoint(tmp_path, s) for s in (5, 10, 15))
    writing = fake_checkpoint(tmp_path, 20, complete=False)  # being saved now: no marker yet
    assert complete_checkpoints(tmp_path) == [s5, s10, s15]

    assert prune_checkpoints(tmp_path, keep=2) == [s5]
    assert is_weights_only(s5) and is_whole(s10) and is_whole(s15)
    assert prune_checkpoints(tmp_path, keep=1) == [s10]
    assert is_weights_only(s10) and is_whole(s15)
    assert (writing / ENGINE_DIR).is_dir() and (writing / "model.safetensors").is_file()  # untouched
    assert prune_checkpoints(tmp_path, keep=1) == []  # idempotent
    assert complete_checkpoints(tmp_path) == [s15]  # what --resume finds


def test_the_last_complete_checkpoint_keeps_its_engine_state_until_a_newer_one_is_complete(tmp_path):
    """A newer save that failed verification (cut off, truncated) never costs the last complete one its
    optimizer state; incomplete folders older than it are pruned like any other."""
    cut_older = fake_checkpoint(tmp_path, 1, complete=False)
    last = fake_checkpoint(tmp_path, 2)
    truncated = fake_checkpoint(tmp_path, 3)
    (truncated / "model.safetensors").write_bytes(b"w")
    assert prune_checkpoints(tmp_path, keep=1) == [cut_older]
    assert is_whole(last) and (truncated / ENGINE_DIR).is_dir()
    assert latest_checkpoint(tmp_path) == last


def test_an_interrupted_prune_is_finished_next_time(tmp_path):
    old, new = fake_checkpoint(tmp_path, 1), fake_checkpoint(tmp_path, 2)
    (old / ENGINE_FILE).unlink()  # cut off mid-rmtree of an older prune order: the marker no longer matches
    assert prune_checkpoints(tmp_path, keep=1) == [old]
    assert is_weights_only(old) and is_whole(new)


def test_keep_none_keeps_everything_and_zero_is_refused(tmp_path):
    paths = [fake_checkpoint(tmp_path, s) for s in (1, 2, 3)]
    assert prune_checkpoints(tmp_path, keep=None) == []
    assert prune_checkpoints(tmp_path, keep=5) == []
    assert all(is_whole(p) for p in paths)
    with pytest.raises(ValueError, match="newest checkpoint always stays whole"):
        prune_checkpoints(tmp_path, keep=0)
    assert prune_checkpoints(tmp_path / "no-checkpoints-yet", keep=1) == []


# ------------------------------------------------------------------------------------- the driver's writes


def test_a_full_disk_fails_the_save_names_the_file_and_removes_the_folder(tmp_path):
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        last = fake_checkpoint(disk, 1)
        path = disk / "checkpoints" / "step-000002"
        (path / ENGINE_DIR).mkdir(parents=True)  # an earlier attempt at step 2, cut off
        fill(disk)
        groups = path / STREAM_GROUPS
        with pytest.raises(CheckpointWriteError) as e, writing_checkpoint(path) as out:
            assert not out.exists()  # the earlier attempt is gone before anything is written
            groups.parent.mkdir(parents=True)
            groups.write_text(json.dumps([[{"rollout_id": f"r{i}"} for i in range(8)]] * 1000))  # ~200 KB
        message = str(e.value)
        assert message.startswith(f"could not write checkpoint {path}: writing {groups} (")
        assert "No space left on device" in message and "bytes free on the filesystem" in message
        assert not path.exists() and is_whole(last)


def test_other_errors_pass_through_and_still_remove_the_folder(tmp_path):
    path = tmp_path / "checkpoints" / "step-000001"
    with pytest.raises(KeyError), writing_checkpoint(path):
        path.mkdir(parents=True)
        raise KeyError("a learner died")
    assert not path.exists()


# ------------------------------------------------------------------------------------- --resume


def test_resume_plan_names_the_checkpoint_what_it_resumes_and_what_it_skipped(tmp_path):
    run_dir = run_dir_with_config(tmp_path)
    fake_checkpoint(run_dir, 4, groups=3)
    truncated = fake_checkpoint(run_dir, 6)
    (truncated / ENGINE_FILE).write_bytes(b"")
    fake_checkpoint(run_dir, 8, complete=False)
    plan = resume_plan(run_dir)
    assert (plan.step, plan.ready_groups, plan.in_flight_groups, plan.data_position) == (4, 3, 4, POOL)
    assert plan.partial_groups == 1
    assert [p.name for p, _ in plan.skipped] == ["step-000008", "step-000006"]
    text = plan.describe()
    assert "from step-000004 (step 4): 3 saved complete groups" in text
    assert "4 in-flight groups to run again (1 keep their finished rollouts), data position epoch 1" in text
    assert f"skipped step-000008: no {CHECKPOINT_MARKER}" in text
    assert "skipped step-000006: deepspeed/engine/mp_rank_00_model_states.pt has 0 bytes" in text


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "no such directory"),
        ("no-config", "no config.yaml, so it is not a lightning-ray run directory"),
        ("no-checkpoint", "no complete checkpoint under"),
        ("only-incomplete", "folders found: step-000002: no lightning_ray_checkpoint.json"),
    ],
)
def test_resume_plan_refuses_a_folder_it_cannot_resume(tmp_path, layout, message):
    run_dir = tmp_path / "run"
    if layout != "missing":
        run_dir.mkdir()
    if layout in ("no-checkpoint", "only-incomplete"):
        run_dir_with_config(run_dir)
    if layout == "only-incomplete":
        fake_checkpoint(run_dir, 2, complete=False)
    with pytest.raises(ResumeError) as e:
        resume_plan(run_dir)
    assert str(e.value).startswith(f"--resume {run_dir}: ") and message in str(e.value)
