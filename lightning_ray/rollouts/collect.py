"""Run one batch of tasks through the rollout workers and gather it as Arrow tables plus a summary."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from tqdm import tqdm

from lightning_ray.data.schema import GROUP_TABLES, concat_refs
from lightning_ray.monitor.summary import BatchSummary, summarize_batch


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


def collect_batch(
    pool: Any,
    workers: list[Any],
    num_tasks: int,
    group_size: int | None = None,
    desc: str = "rollouts",
    progress: bool = True,
    sampling: dict[str, Any] | None = None,
) -> Batch:
    """Start a batch of `num_tasks` tasks (x group size) on the pool, let every worker drain it, and return it.

    Tables come back as the object refs the workers reported (`TaskPoolActor.report_group`), concatenated once
    here; each group's tables are the result of all of its rollouts, so they are de-duplicated first.
    """
    t0 = time.perf_counter()
    batch_id = ray.get(pool.start_batch.remote(num_tasks, group_size))
    total = ray.get(pool.stats.remote(batch_id))["rollouts"]
    work = [w.work.remote(batch_id, pool, sampling) for w in workers]
    with tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True) as bar:
        pending = work
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            stats = ray.get(pool.stats.remote(batch_id))
            bar.n = stats["final"]
            bar.set_postfix(ok=stats["succeeded"], failed=stats["final"] - stats["succeeded"], refresh=False)
            bar.refresh()
    ray.get(work)  # re-raise a worker's crash here
    records = ray.get(pool.batch_results.remote(batch_id))
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
    ray.get(pool.forget_batch.remote(batch_id))
    return Batch(
        tables["transitions"], tables["rollouts"], records, summarize_batch(records), time.perf_counter() - t0
    )


def accepted_rows(table: pa.Table, accepted: dict[str, int]) -> pa.Table:
    """Rows of the attempt the pool accepted: a group table can hold a rollout whose report came too late
    (its lease had been revoked and it ran again elsewhere)."""
    ids = pa.array(list(accepted), pa.string())
    attempts = pa.array(list(accepted.values()), pa.int32())
    key = pc.binary_join_element_wise(table["rollout_id"], pc.cast(table["attempt"], pa.string()), ":")
    wanted = pc.binary_join_element_wise(ids, pc.cast(attempts, pa.string()), ":")
    return table.filter(pc.is_in(key, wanted))
