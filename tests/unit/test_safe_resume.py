"""`--resume` refuses a checkpoint whose engine state would unpickle code, naming the file, before anything
runs; the learner's loader (`weights_only_load`) refuses it too, and still loads DeepSpeed's real state types."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from lightning_ray.checkpoints import CHECKPOINT_MARKER, ResumeError, manifest, resume_plan
from lightning_ray.safe_pickle import UnsafeCheckpointFile, unsafe_files, weights_only_load

ENGINE_FILE = Path("deepspeed/engine/mp_rank_00_model_states.pt")


class Payload:
    """Unpickling this creates a folder: the proof that a pickle ran code."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (str(self.target),)


def run_dir_with(tmp_path: Path, write_engine_state) -> tuple[Path, Path]:
    """A run directory whose one complete checkpoint holds `write_engine_state(path)` as its engine state."""
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "step-000001"
    (ckpt / ENGINE_FILE).parent.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("trainer: {}\n")
    (ckpt / "model.safetensors").write_bytes(b"w" * 8)
    write_engine_state(ckpt / ENGINE_FILE)
    marker = {"world_size": 1, "zero_stage": 0, "extra": {"step": 1}, "files": manifest(ckpt)}
    (ckpt / CHECKPOINT_MARKER).write_text(json.dumps(marker))
    return run_dir, ckpt / ENGINE_FILE


def test_resume_refuses_an_engine_state_that_runs_code(tmp_path):
    ran = tmp_path / "payload-ran"
    run_dir, engine_file = run_dir_with(
        tmp_path, lambda p: torch.save({"module": torch.zeros(2), "x": Payload(ran)}, p)
    )
    with pytest.raises(ResumeError) as info:
        resume_plan(run_dir)
    text = str(info.value)
    assert "step-000001 holds files that are not safe to load" in text
    assert "deepspeed/engine/mp_rank_00_model_states.pt: a pickle that needs posix.mkdir" in text
    with pytest.raises(UnsafeCheckpointFile, match=f"{engine_file}: refused to load"):
        weights_only_load(engine_file)
    assert not ran.exists()


def test_resume_refuses_a_raw_pickle(tmp_path):
    run_dir, _ = run_dir_with(tmp_path, lambda p: p.write_bytes(pickle.dumps({"step": 1})))
    with pytest.raises(ResumeError, match="mp_rank_00_model_states.pt: a raw pickle"):
        resume_plan(run_dir)


def test_deepspeed_state_types_load_weights_only(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {
        "module": {"w": torch.arange(4.0)},
        "zero_stage": ZeroStageEnum.gradients,
        "loss_scaler": LossScaler(1.0),
        "fragment": fragment_address(numel=4, start=0),
        "optimizer_steps": 3,
    }
    run_dir, engine_file = run_dir_with(tmp_path, lambda p: torch.save(state, p))
    assert unsafe_files(engine_file.parents[2]) == []
    assert resume_plan(run_dir).step == 1
    loaded = weights_only_load(engine_file)
    assert torch.equal(loaded["module"]["w"], torch.arange(4.0))
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and loaded["optimizer_steps"] == 3
    assert loaded["fragment"] == fragment_address(numel=4, start=0)
