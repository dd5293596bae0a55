"""Run one batch of tasks through the rollout workers and gather it as Arrow tables plus a summary."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from tqdm import tqdm

from lightning_ray.data.schema import GROUP_TABLES, ROLLOUT_SCHEMA, concat_refs
from lightning_ray.faults import TaskPoolLost, get, stall_check
from lightning_ray.monitor.summary import BatchSummary, summarize_batch
from lightning_ray.monitor.watchdog import PROBE_TIMEOUT_S

if TYPE_CHECKING:
    from lightning_ray.rollouts.supervisor import RolloutWorkers


@dataclass
class Batch:
    transitions: pa.Table  # one row per LLM call (what the learner trains on)
    rollouts: pa.Table  # one row per rollout that reached a worker's report, failures included
    records: list[Any]  # the pool's final record of every rollout of the batch (abandoned ones too)
    summary: BatchSummary
    seconds: float
    dropped: pa.Table | None = (
        None  # a streamed batch: the calls of the groups the step used up and did not train
    )
    ended: pa.Table | None = None  # a streamed batch: how each rollout of every group it used up ended
    cut: int = 0  # a streamed batch: groups cut once it was taken, too stale for any later batch

    def calls_used(self) -> pa.Table:
        """Every call of the groups the batch used up: those it trains on, and those dropped before training."""
        return (
            self.transitions if self.dropped is None else pa.concat_tables([self.transitions, self.dropped])
        )


def collect_batch(
    pool: Any,
    workers: RolloutWorkers,
    num_tasks: int,
    group_size: int | None = None,
    desc: str = "rollouts",
    progress: bool = True,
    sampling: dict[str, Any] | None = None,
) -> Batch:
    """Start a batch of `num_tasks` tasks (x group size) on the pool, let every worker drain it, and return it.

    A worker that dies is replaced (`RolloutWorkers.check`) and the pool runs its rollouts again elsewhere. A
    batch in which nothing progresses (no rollout ends, no LLM call is recorded) for `trainer.stall_timeout_s`
    ends in `RunStalled`: a frozen worker or an agent that never returns does not hang the caller.
    Tables come back as the object refs the workers reported (`TaskPoolActor.report_group`), concatenated once
    here; each group's tables are the result of all of its rollouts, so they are de-duplicated first.
    """
    t0 = time.perf_counter()
    timeout = workers.cfg.trainer.stall_timeout_s

    def call(ref: ray.ObjectRef, what: str) -> Any:
        return get(ref, f"task pool {what}", timeout, lost=TaskPoolLost)

    batch_id = call(pool.start_batch.remote(num_tasks, group_size), "start_batch")
    total = call(pool.stats.remote(batch_id), "stats")["rollouts"]
    workers.serve(batch_id, pool, sampling)

    def progressed() -> str:
        final = call(pool.stats.remote(batch_id), "stats")["final"]
        return f"{final} of {total} rollouts ended, {workers.llm_calls()} LLM calls recorded"

    check_stall = stall_check(f"{desc}: the workers did not finish the batch", timeout, progressed)
    with tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True) as bar:
        while not workers.finished(batch_id, timeout_s=0.5):
            stats = call(pool.stats.remote(batch_id), "stats")
            bar.n = stats["final"]
            bar.set_postfix(ok=stats["succeeded"], failed=stats["final"] - stats["succeeded"], refresh=False)
            bar.refresh()
            check_stall()
    workers.release(batch_id)  # re-raises a worker's crash that is not its death
    records = call(pool.batch_results.remote(batch_id), "batch_results")
    groups = {
        tuple(ref.binary() for ref in r.result.values()): r.result
        for r in records
        if isinstance(r.result, dict)
    }
    accepted = {r.rollout_id: r.attempts for r in records if r.status != "abandoned"}
    tables = {
        name: accepted_rows(concat_refs([g[name] for g in groups.values()], schema), accepted)
        for name, schema in GROUP_TABLES.items()
    }
    call(pool.forget_batch.remote(batch_id), "forget_batch")
    return Batch(
        tables["transitions"], tables["rollouts"], records, summarize_batch(records), time.perf_counter() - t0
    )


def first_tasks(
    pool: Any, workers: RolloutWorkers, limit: int | None, sampling: dict[str, Any], desc: str
) -> Batch:
    """The pool's first `limit` tasks (all when None), one rollout each with `sampling` (and its `prompts`):
    the same tasks every call, in the pool's order. Validation and `lightning-ray optimize` score this way."""
    num_tasks = get(pool.num_tasks.remote(), f"{desc} pool", PROBE_TIMEOUT_S, lost=TaskPoolLost)
    get(pool.rewind.remote(), f"{desc} pool", PROBE_TIMEOUT_S, lost=TaskPoolLost)
    n = min(limit or num_tasks, num_tasks)
    return collect_batch(pool, workers, n, group_size=1, desc=desc, sampling=sampling)


def held_out_scores(batch: Batch, success_threshold: float) -> dict[str, float]:
    """success_rate (rewards reaching `success_threshold`), reward_mean (a failed rollout counts 0) and
    failure_rate of a batch of one rollout per task."""
    rewards = [r.reward for r in batch.records]
    solved = sum(1 for r in rewards if r is not None and r >= success_threshold)
    return {
        "success_rate": solved / max(len(rewards), 1),
        "reward_mean": sum(r or 0.0 for r in rewards) / max(len(rewards), 1),
        "failure_rate": batch.summary.failure_rate,
    }


def rollout_records(records: list[Any], rollouts: pa.Table) -> pa.Table:
    """One row per rollout of `records`, how it ended: its row of `rollouts` (status, failure kind, traceback,
    captured logs) where a worker reported one, else a row made from the pool's record (a rollout whose every
    attempt died with its worker, or that was abandoned before it ran)."""
    reported = set(rollouts["rollout_id"].to_pylist())
    missing = [
        {
            "rollout_id": r.rollout_id,
            "task_id": r.task_id,
            "group_id": r.group_id,
            "attempt": r.attempts,
            "status": r.status,
            "failure_kind": r.kind,
            "error_message": json.dumps(r.failure) if r.failure else None,
            "reward": r.reward,
            "num_calls": 0,
            "worker": r.worker_id,
        }
        for r in records
        if r.rollout_id not in reported
    ]
    wanted = pc.is_in(rollouts["rollout_id"], pa.array([r.rollout_id for r in records], pa.string()))
    return pa.concat_tables([rollouts.filter(wanted), pa.Table.from_pylist(missing, schema=ROLLOUT_SCHEMA)])


def accepted_rows(table: pa.Table, accepted: dict[str, int]) -> pa.Table:
    """Rows of the attempt the pool accepted: a group table can hold a rollout whose report came too late
    (its lease had been revoked and it ran again elsewhere)."""
    ids = pa.array(list(accepted), pa.string())
    attempts = pa.array(list(accepted.values()), pa.int32())
    key = pc.binary_join_element_wise(table["rollout_id"], pc.cast(table["attempt"], pa.string()), ":")
    wanted = pc.binary_join_element_wise(ids, pc.cast(attempts, pa.string()), ":")
    return table.filter(pc.is_in(key, wanted))
