"""metrics.jsonl survives a crash: a line cut in half is skipped by every reader, a resume rewrites the file to
one row per step up to its checkpoint, and a full disk is a named error that leaves no half row behind (on a
real tmpfs the test mounts)."""

from __future__ import annotations

import json
import logging

import pytest

from lightning_ray.config import load_config
from lightning_ray.monitor.run_log import RunLog, append_row, read_metrics
from lightning_ray.run_files import RunFileWriteError
from tests.unit.test_checkpoints import fake_checkpoint, fill, run_dir_with_config, small_tmpfs


def run_log_config():
    return load_config(None, ["logging.wandb=false", "logging.report=false"], check_files=False)


def test_readers_skip_a_line_cut_in_half(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    for step in range(3):
        append_row(path, {"step": step, "rollout/reward_mean": step / 10})
    with path.open("a") as f:
        f.write('{"step": 3, "rollout/rew')  # the driver was killed mid-write
    with caplog.at_level(logging.WARNING):
        rows = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[2]["rollout/reward_mean"] == 0.2
    assert f"{path}: line 4 is cut off or corrupt, skipped" in caplog.text


def test_a_resume_rewrites_one_row_per_step_up_to_its_checkpoint(tmp_path, caplog):
    run_dir = run_dir_with_config(tmp_path)
    fake_checkpoint(run_dir, 2)
    path = run_dir / "metrics.jsonl"
    for step, value in [(0, 0.0), (1, 0.1), (2, 0.2), (2, 0.25), (3, 0.3), (4, 0.4)]:
        append_row(path, {"step": step, "rollout/reward_mean": value})
    with path.open("a") as f:
        f.write('{"step": 5, "rollout/rew')

    with caplog.at_level(logging.WARNING):
        log = RunLog(run_log_config(), run_dir, resume=True)
    assert [(r["step"], r["rollout/reward_mean"]) for r in log.rows] == [(0, 0.0), (1, 0.1), (2, 0.25)]
    assert (
        "line 7 is cut off" in caplog.text
        and "dropped the rows of steps 3-4, after the resumed step 2" in caplog.text
    )
    log.log(3, {"rollout/reward_mean": float("nan")})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3]  # exactly one row per step
    assert json.loads(lines[-1])["rollout/reward_mean"] is None


def test_a_full_disk_is_a_named_error_and_leaves_no_half_row(tmp_path):
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        path = disk / "metrics.jsonl"
        append_row(path, {"step": 1, "loss": 0.5})
        before = path.read_bytes()
        fill(disk)
        big = {f"metric/{i}": float(i) for i in range(2000)}  # ~40 KB: more than the page the file has left
        with pytest.raises(RunFileWriteError) as e:
            append_row(path, {"step": 2, **big})
        assert str(e.value).startswith(f"could not write {path}: appending the row of step 2 (")
        assert "No space left on device" in str(e.value)
        assert path.read_bytes() == before  # cut back: readers and a resume see whole rows only
        assert [r["step"] for r in read_metrics(path)] == [1]
