"""What a crash or a full disk must not destroy, with the real learners (DeepSpeed ZeRO-2 on two ranks, gloo,
the tiny model) writing into a real tmpfs the test mounts (root only; skipped, saying why, elsewhere):
a save that fills the disk is a named error on every rank (none left waiting in a collective), its folder is
removed, and the last complete checkpoint stays whole and resumable; a checkpoint truncated after its marker
is skipped. Run under the shared lock:
    flock /tmp/lr-heavy.lock python -m pytest tests/integration/test_checkpoint_faults.py -x -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lightning_ray.algorithms.advantages import compute_advantages
from lightning_ray.checkpoints import (
    CHECKPOINT_MARKER,
    ENGINE_DIR,
    STREAM_GROUPS,
    CheckpointWriteError,
    IncompleteCheckpoint,
    checkpoint_problem,
    prune_checkpoints,
    resume_plan,
    writing_checkpoint,
)
from lightning_ray.config import AlgorithmConfig
from lightning_ray.learner.group import LearnerFailed, LearnerGroup
from tests.integration.test_learner import learner_cfg, make_table
from tests.unit.test_checkpoints import run_dir_with_config
from tests.unit.test_run_log import small_tmpfs


def cause(error: BaseException, kind: type[BaseException]) -> BaseException:
    """The `kind` error behind `error` (`LearnerGroup` wraps a rank's error in `LearnerFailed`)."""
    while not isinstance(error, kind):
        assert error.__cause__ is not None, f"no {kind.__name__} behind {error!r}"
        error = error.__cause__
    return error


def save(group: LearnerGroup, run_dir: Path, step: int) -> Path:
    """As the driver saves: its own file (the stream's groups) first, then the learners', in one folder."""
    path = run_dir / "checkpoints" / f"step-{step:06d}"
    with writing_checkpoint(path):
        (path / STREAM_GROUPS).parent.mkdir(parents=True)
        (path / STREAM_GROUPS).write_text(json.dumps([[{"rollout_id": f"s{step}"}]]))
        return group.save_checkpoint(path, extra={"step": step, "pool": {"epoch": 0, "cursor": step}})


@pytest.mark.timeout(300)  # a rank left waiting in a collective would hang here
def test_disk_full_while_saving_keeps_the_last_complete_checkpoint(ray_cluster, tiny_model_dir, tmp_path):
    batch, _ = compute_advantages(make_table(), AlgorithmConfig())
    with small_tmpfs(tmp_path / "disk", "400m") as disk:
        run_dir = run_dir_with_config(disk / "run")
        group = LearnerGroup(learner_cfg(), tiny_model_dir)
        try:
            group.train_step(batch, AlgorithmConfig())
            first = save(group, run_dir, 1)
            assert checkpoint_problem(first) is None
            listed = json.loads((first / CHECKPOINT_MARKER).read_text())["files"]
            assert "sha256" in listed[STREAM_GROUPS.as_posix()] and "model.safetensors" in listed
            assert any(name.startswith(f"{ENGINE_DIR}/") for name in listed)  # every rank's engine state

            # Room for the HF folder, not for the engine state: the disk fills inside DeepSpeed's save.
            hf_bytes = sum(f.stat().st_size for f in first.iterdir() if f.is_file())
            filler = disk / "filler"
            with filler.open("wb") as f:
                for _ in range((shutil.disk_usage(disk).free - hf_bytes) // (1 << 20) - 4):
                    f.write(b"\1" * (1 << 20))
            group.train_step(batch, AlgorithmConfig())
            second = run_dir / "checkpoints" / "step-000002"
            with pytest.raises(CheckpointWriteError) as e:  # the rank's own named error, not LearnerFailed
                save(group, run_dir, 2)
            message = str(e.value)
            assert f"could not write checkpoint {second}" in message and "rank 0: writing" in message
            assert "No space left on device" in message and "bytes free on the filesystem" in message
            assert not second.exists()  # the half-written folder is gone, so is its disk space

            assert checkpoint_problem(first) is None  # the last complete checkpoint is whole ...
            assert prune_checkpoints(run_dir, keep=1) == [] and (first / ENGINE_DIR).is_dir()
            plan = resume_plan(run_dir)  # ... and what --resume continues from, with new learners
            assert (plan.checkpoint, plan.step, plan.ready_groups) == (first, 1, 1)
            group.shutdown()
            group = LearnerGroup(learner_cfg(), tiny_model_dir)
            assert group.load_checkpoint(first)["extra"]["step"] == 1

            filler.unlink()  # space again: the resumed learners save
            group.train_step(batch, AlgorithmConfig())
            assert checkpoint_problem(save(group, run_dir, 2)) is None
            assert prune_checkpoints(run_dir, keep=1) == [first]

            engine_file = max((second / ENGINE_DIR).rglob("*.pt"), key=lambda f: f.stat().st_size)
            with engine_file.open("r+b") as f:
                f.truncate(engine_file.stat().st_size // 2)  # the disk lost its tail after the marker
            with pytest.raises((IncompleteCheckpoint, LearnerFailed)) as e:
                group.load_checkpoint(second)
            assert f"{second} is not a complete checkpoint" in str(cause(e.value, IncompleteCheckpoint))
        finally:
            group.shutdown()
