"""Checkpoint pruning on a run directory laid out as the learner writes it (small fake files, real function)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_ray.checkpoints import complete_checkpoints, prune_checkpoints
from lightning_ray.learner.checkpoint import CHECKPOINT_MARKER, ENGINE_DIR


def fake_checkpoint(run_dir: Path, step: int, complete: bool = True) -> Path:
    path = run_dir / "checkpoints" / f"step-{step:06d}"
    (path / ENGINE_DIR / "engine").mkdir(parents=True)
    (path / ENGINE_DIR / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"o" * 64)
    (path / "model.safetensors").write_bytes(b"w" * 8)
    (path / "config.json").write_text("{}")
    if complete:
        (path / CHECKPOINT_MARKER).write_text(json.dumps({"extra": {"step": step}}))
    return path


def is_whole(path: Path) -> bool:
    return (path / CHECKPOINT_MARKER).is_file() and (path / ENGINE_DIR).is_dir()


def is_weights_only(path: Path) -> bool:
    return (
        not (path / CHECKPOINT_MARKER).exists()
        and not (path / ENGINE_DIR).exists()
        and (path / "model.safetensors").is_file()
        and (path / "config.json").is_file()
    )


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


def test_an_interrupted_prune_is_finished_next_time(tmp_path):
    old, new = fake_checkpoint(tmp_path, 1), fake_checkpoint(tmp_path, 2)
    (old / ENGINE_DIR / "engine" / "mp_rank_00_model_states.pt").unlink()  # cut off mid-rmtree
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
