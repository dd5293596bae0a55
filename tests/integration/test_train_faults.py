"""Faults of whole training runs on the real stack with the tiny model: each ends in a named state, the run goes on
or resumes, and the run's summary proves that no rollout was lost.

Like the other `test_train_*` files it runs after the tests that share the session's inference app: `train` deletes
the app when it stops the rollout stack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import yaml
from test_train_async import assert_every_rollout_ends_once, run_dir_of
from test_train_loop import REPO, loop_config

from lightning_ray.faults import RunStalled, TaskPoolLost
from lightning_ray.learner import LearnerFailed
from lightning_ray.learner.checkpoint import CHECKPOINT_MARKER
from lightning_ray.loop import train
from lightning_ray.monitor.run_log import read_metrics
from lightning_ray.monitor.summary import FailureRateExceeded
from lightning_ray.monitor.watchdog import live_actors
from lightning_ray.names import task_pool
from lightning_ray.rollouts.ledger import read_ledger
from lightning_ray.tasks.dataset import load_tasks
from lightning_ray.tasks.order import TaskOrder


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def assert_nothing_lost(run_dir: Path) -> dict:
    """The run's summary accounts for every rollout it started, and the ledger agrees with it."""
    acc = summary_of(run_dir)["rollouts"]
    assert acc["lost"] == 0
    ended = acc["trained"] + sum(acc["dropped"].values()) + sum(acc["failed"].values())
    assert ended == acc["started"] > 0
    assert len(read_ledger(run_dir / "ledger.jsonl")) == ended + acc["before_resume"]
    return acc


def kill_when_present(root: Path, pattern: str, kill: Callable[[], None], poll_s: float) -> threading.Thread:
    """A thread that calls `kill` once a file matching `pattern` appears under `root` (at most 300 s)."""

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if list(root.glob(pattern)):
                kill()
                return
            time.sleep(poll_s)

    killer = threading.Thread(target=watch, daemon=True)
    killer.start()
    return killer


@pytest.mark.slow  # CI time (~140 s): a worker killed mid-batch is tested in CI on the pool and worker alone
def test_a_killed_rollout_worker_is_replaced_and_its_rollouts_run_elsewhere(inference, tiny_config, tmp_path):
    cfg = loop_config(tiny_config, tmp_path, steps=3)
    marker = tmp_path / "killed"
    data = Path(cfg.data.train)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    cfg.data.train = str(tmp_path / "train.jsonl")  # validation keeps the tasks without the marker
    Path(cfg.data.train).write_text(
        "".join(json.dumps({**r, "kill_marker": str(marker)}) + "\n" for r in rows)
    )
    cfg.rollout.agent = "tests.fault_agents:kills_its_worker_once"
    cfg.rollout.num_workers, cfg.rollout.concurrency = 2, 4
    cfg.trainer.val_every, cfg.trainer.checkpoint_every = 1, 3

    rows = train(cfg)
    assert marker.exists()  # a worker really died
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    run_dir = run_dir_of(tmp_path)
    summary = summary_of(run_dir)
    assert summary["status"] == "completed" and summary["worker_restarts"] == 1
    assert "ActorDiedError" in summary["worker_deaths"][0] or "died" in summary["worker_deaths"][0]
    assert rows[-1]["rollout/worker_restarts"] == 1
    assert_every_rollout_ends_once(run_dir, 3, cfg.trainer.tasks_per_step, cfg.trainer.max_staleness)
    assert_nothing_lost(run_dir)
    ledger = read_ledger(run_dir / "ledger.jsonl")
    assert any(e["attempts"] >= 2 for e in ledger)  # what the dead worker ran, ran again
    # how each rollout of each step ended, with the worker that ran it
    records = pq.read_table(run_dir / "trajectories" / "step-000001-rollouts.parquet")
    assert records.num_rows == cfg.trainer.tasks_per_step * cfg.algorithm.group_size
    assert set(records["status"].to_pylist()) <= {"succeeded", "failed", "timed_out", "abandoned"}


@pytest.mark.slow  # CI time (~110 s): the watchdog's verdicts and stack dumps are unit-tested (test_watchdog.py)
def test_a_run_where_nothing_progresses_stops_named_with_every_actors_stack(inference, tiny_config, tmp_path):
    cfg = loop_config(tiny_config, tmp_path, steps=1)
    cfg.rollout.agent = "tests.fault_agents:never_returns"
    cfg.rollout.timeout_s, cfg.rollout.lease_timeout_s = 900, 1200
    cfg.trainer.val_every, cfg.trainer.stall_timeout_s = 0, 10

    t0 = time.monotonic()
    with pytest.raises(RunStalled, match="nothing progressed"):
        train(cfg)
    assert time.monotonic() - t0 < 240
    run_dir = run_dir_of(tmp_path)
    [stall] = list((run_dir / "stalls").iterdir())
    assert "rollouts ended" in (stall / "cause.txt").read_text()
    assert "next_batch" in (stall / "driver.txt").read_text()  # the driver waited for its batch
    workers = [p for p in stall.iterdir() if p.name.startswith("RolloutWorker")]
    assert workers and any("never_returns" in p.read_text() for p in workers)  # where the agent is stuck
    summary = summary_of(run_dir)
    assert summary["status"] == "stopped" and summary["cause"].startswith("RunStalled")
    assert summary["rollouts"]["not_ended_at_stop"] == cfg.trainer.tasks_per_step * cfg.algorithm.group_size


@pytest.mark.slow  # CI time (~100 s): the failure-rate check is tested in CI on a batch alone (test_taskpool.py)
@pytest.mark.parametrize("staleness", [0, 1])  # K >= 1 replaces dropped groups: it must not do so forever
def test_the_batch_that_trips_the_failure_rate_stop_keeps_its_records(
    inference, tiny_config, tmp_path, staleness
):
    cfg = loop_config(tiny_config, tmp_path, steps=2)
    cfg.rollout.agent = "tests.fault_agents:always_fails"
    cfg.rollout.max_failure_rate, cfg.trainer.val_every = 0.25, 0
    cfg.trainer.max_staleness = staleness
    cfg.algorithm.old_logprobs = "decoupled" if staleness else "recompute"

    with pytest.raises(FailureRateExceeded, match="exceeds rollout.max_failure_rate=25.0%"):
        train(cfg)
    run_dir = run_dir_of(tmp_path)
    rows = pq.read_table(run_dir / "trajectories" / "step-000001-rollouts.parquet").to_pylist()
    started = cfg.trainer.tasks_per_step * cfg.algorithm.group_size
    assert len({r["rollout_id"] for r in rows}) == len(rows) == started  # every rollout of the batch, once
    for r in rows:
        assert r["status"] == "failed" and r["failure_kind"] == "agent_exception"
        assert r["error_type"] == "ValueError" and "always fails: " in r["traceback"]
        assert "raise ValueError" in r["traceback"]  # the whole traceback, with the agent's line
        assert f"about to fail on {r['task_id']}" in r["logs"]
    summary = summary_of(run_dir)
    assert summary["status"] == "stopped" and summary["cause"].startswith("FailureRateExceeded")
    acc = summary["rollouts"]  # a stopped run names `lost` not_ended_at_stop: rollouts --resume runs again
    assert acc["trained"] == 0 and acc["failed"] == {"agent_exception": started}
    ledger = read_ledger(run_dir / "ledger.jsonl")
    assert sorted(e["rollout_id"] for e in ledger) == sorted(r["rollout_id"] for r in rows)
    if staleness == 0:  # the batch was all the run started
        assert acc["not_ended_at_stop"] == 0 and acc["started"] == started and acc["dropped"] == {}


@pytest.mark.slow
def test_a_killed_task_pool_stops_the_run_named_and_resume_continues(inference, tiny_config, tmp_path):
    cfg = loop_config(tiny_config, tmp_path, steps=3)
    cfg.trainer.val_every = 0

    killer = kill_when_present(
        tmp_path / "runs" / "loop",
        "*/checkpoints/step-000001/*.json",
        lambda: ray.kill(ray.get_actor(task_pool(cfg, "train"))),  # train() gave cfg its run id
        poll_s=0.2,
    )
    with pytest.raises(TaskPoolLost, match="task pool"):
        train(cfg)
    killer.join()
    run_dir = run_dir_of(tmp_path)
    assert summary_of(run_dir)["cause"].startswith("TaskPoolLost")

    train(cfg, resume=str(run_dir))
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")][-3:] == [1, 2, 3]
    assert summary_of(run_dir)["status"] == "completed"
    assert_every_rollout_ends_once(run_dir, 3, cfg.trainer.tasks_per_step, cfg.trainer.max_staleness)
    assert_nothing_lost(run_dir)


def start_driver(args: list[str], log: Path) -> subprocess.Popen:
    """`lightning-ray train ...` in a session of its own: its local Ray cluster, vLLM and learner included, so
    that killing the session's process group is a preempted machine."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "lightning_ray.cli", "train", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.mark.slow
def test_a_driver_killed_mid_step_resumes_without_losing_or_repeating_a_rollout(tiny_config, tmp_path):
    cfg = loop_config(tiny_config, tmp_path, steps=3)
    cfg.trainer.val_every, cfg.ray.num_cpus = 0, 8
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump()))
    runs = tmp_path / "runs" / "loop"

    first = start_driver([str(config)], tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 600
        while not list(runs.glob(f"*/checkpoints/step-000001/{CHECKPOINT_MARKER}")):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint of step 1 in 10 minutes"
            time.sleep(0.2)
        time.sleep(1.0)  # step 2's rollouts run
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    [run_dir] = list(runs.iterdir())
    assert not (run_dir / "checkpoints" / "step-000003").exists(), "the run ended before it was killed"

    second = start_driver([str(config), "--resume", str(run_dir)], tmp_path / "second.log")
    try:
        assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    assert "resum" in (tmp_path / "second.log").read_text()
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert_every_rollout_ends_once(run_dir, 3, cfg.trainer.tasks_per_step, cfg.trainer.max_staleness)
    assert summary_of(run_dir)["status"] == "completed"
    assert_nothing_lost(run_dir)
    # the data position is exact: the steps used up the dataset's first 6 tasks in its seeded order, in turn
    order = TaskOrder(load_tasks(cfg.data.train), shuffle=cfg.data.shuffle, seed=cfg.data.seed)
    expected = [t.task_id for t in order.draw(3 * cfg.trainer.tasks_per_step)]
    used = {}
    for e in read_ledger(run_dir / "ledger.jsonl"):
        used.setdefault(e["version"], set()).add(e["task_id"])
    assert [used[v] for v in (0, 1, 2)] == [set(expected[i : i + 2]) for i in (0, 2, 4)]


@pytest.mark.slow
def test_a_learner_rank_killed_mid_run_stops_named_and_resume_continues(inference, tiny_config, tmp_path):
    cfg = loop_config(tiny_config, tmp_path, steps=3)
    cfg.trainer.val_every = 0
    cfg.learner.num_workers, cfg.learner.num_cpus_per_worker = 2, 0.25

    def kill_rank_1() -> None:
        [pid] = [a["pid"] for a in live_actors() if a["class"] == "LearnerWorker"][1:2]
        os.kill(pid, signal.SIGKILL)

    killer = kill_when_present(
        tmp_path / "runs" / "loop", "*/trajectories/step-000002.parquet", kill_rank_1, 0.05
    )
    with pytest.raises(LearnerFailed, match="learner rank"):
        train(cfg)
    killer.join()
    run_dir = run_dir_of(tmp_path)
    assert summary_of(run_dir)["cause"].startswith("LearnerFailed")

    train(cfg, resume=str(run_dir))
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert_every_rollout_ends_once(run_dir, 3, cfg.trainer.tasks_per_step, cfg.trainer.max_staleness)
    assert_nothing_lost(run_dir)
