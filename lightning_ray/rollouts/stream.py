"""Training batches streamed from the task pool under a staleness bound (`trainer.max_staleness: K`).

The pool keeps GRPO groups in flight while the learner trains; each step takes the first complete groups it can
use. Policy versions count optimizer steps: the learner trains version `v` at step `v + 1` and the replicas
serve `v` from the sync after step `v` on. A group may enter the batch of version `v` only if every token of
its trained calls came from version `v - K` or later (a call's `policy_version` is the version it started
on, the oldest of its tokens). Admission keeps staleness low by construction, as AReaL's does: at most
`(v + K + 1) * B` groups are ever started by the time the replicas serve `v` (B = `trainer.tasks_per_step`,
plus `trainer.over_provision` of B, plus replacements), so a group rarely waits more than K versions.

K = 0 is the synchronous loop, exactly: B groups start when the replicas serve `v`, the step waits for all of
them, trains on those with a learning signal (zero-variance groups drop out, as they always did) and the next
B start only on the new weights. With K >= 1 a step takes the first B usable groups: a group dropped (zero
variance, stale, every rollout failed) is replaced by a new one, so the step never trains on less; and once a
batch is taken, a group still running with a call too old for any later batch is cut at once and replaced
(`cut_stale`), rather than run to its end only to be dropped; no group starts on a version too old for the
batch after the one being gathered (`gathering`). Under a canary (`serve --learn`,
`lightning_ray.live.promotion`) `v` is the last promoted version, and a group with a token from a version the
canary rolled back is dropped (`rolled_back`).

Every rollout the stream started ends in exactly one entry of the ledger: `trained`, `dropped` with a reason,
or `failed` with its kind (`lightning_ray.rollouts.ledger`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from lightning_ray.algorithms.advantages import ZERO_STD, group_statistics, rollout_rewards
from lightning_ray.config import Config
from lightning_ray.data.merge import select_trained_calls
from lightning_ray.data.schema import GROUP_TABLES, concat_refs
from lightning_ray.faults import RunStalled, TaskPoolLost, get
from lightning_ray.monitor.summary import summarize_batch
from lightning_ray.rollouts.collect import Batch, accepted_rows, rollout_records
from lightning_ray.rollouts.ledger import Ledger
from lightning_ray.rollouts.supervisor import RolloutWorkers
from lightning_ray.tasks.records import RolloutRecord, cut_reason

WAIT_S = 1.0  # how long one wait on the pool lasts before the driver tops the stream up again


@dataclass
class Group:
    """One complete GRPO group: the pool's records of its rollouts and the rows they produced."""

    group_id: str
    task_id: str
    records: list[Any]
    transitions: pa.Table
    rollouts: pa.Table

    def versions(self, train_agents: list[str] | None) -> set[int]:
        """The policy versions behind its trained calls."""
        trained = select_trained_calls(self.transitions, train_agents)
        return set(pc.unique(trained["policy_version"]).to_pylist())

    def has_signal(self) -> bool:
        """Whether its rollout values differ (a zero-variance group teaches a group-relative estimator nothing)."""
        parts = rollout_rewards(self.transitions)
        values = parts["value"][parts["has_value"]]
        if len(values) < 2:
            return False
        stats = group_statistics(values, np.zeros(len(values), dtype=np.int64), 1)
        return bool(stats["std"][0] > ZERO_STD)

    def missing(self, group_size: int) -> list[int]:
        """Indices of the group's rollouts it has no record of (a group saved before it completed)."""
        have = {r.index_in_group for r in self.records}
        return [i for i in range(group_size) if i not in have]

    def joined(self, rest: Group) -> Group:
        """This group's saved rollouts together with `rest`, the ones that ran after a resume."""
        records = sorted(self.records + rest.records, key=lambda r: r.index_in_group)
        tables = {name: pa.concat_tables([getattr(self, name), getattr(rest, name)]) for name in GROUP_TABLES}
        return Group(self.group_id, self.task_id, records, **tables)


def complete_group(entry: dict[str, Any]) -> Group:
    """A group from the pool's `wait_groups` entry: its tables concatenated once, rows of accepted attempts."""
    records = entry["records"]
    results = {
        tuple(r.binary() for r in x.result.values()): x.result for x in records if isinstance(x.result, dict)
    }
    accepted = {r.rollout_id: r.attempts for r in records if r.status != "abandoned"}
    tables = {
        name: accepted_rows(concat_refs([res[name] for res in results.values()], schema), accepted)
        for name, schema in GROUP_TABLES.items()
    }
    return Group(entry["group_id"], entry["task_id"], records, tables["transitions"], tables["rollouts"])


def spare_groups(over_provision: float, tasks_per_step: int) -> int:
    """The groups K >= 1 keeps in flight beyond the batches' (`trainer.over_provision`), rounded up."""
    return math.ceil(over_provision * tasks_per_step)


class RolloutStream:
    """The driver's side of the pipeline: tops the pool up, takes complete groups, keeps the ledger."""

    def __init__(self, cfg: Config, pool: Any, workers: RolloutWorkers, ledger: Ledger, version: int):
        self.cfg, self.pool, self.workers, self.ledger = cfg, pool, workers, ledger
        self.batch_size, self.max_staleness = cfg.trainer.tasks_per_step, cfg.trainer.max_staleness
        # Groups beyond the budget would go stale at K = 0 before any step could use them.
        self.extra = spare_groups(cfg.trainer.over_provision, self.batch_size) if self.max_staleness else 0
        self.first_version = version
        self.serving = version  # the version the replicas serve: new groups start on it (`top_up`)
        # `top_up` may run on the weight sync's thread (`OverlappedSync`) while the driver takes a batch
        self.lock = threading.RLock()
        self.gathering(version)  # `floor`: no group starts on an older version
        self.batch_id = self.call(pool.open_batch.remote(cfg.algorithm.group_size), "open_batch")
        workers.serve(self.batch_id, pool)
        self.started = 0  # groups started, replacements included
        self.restored_rollouts = 0
        self.replaced = 0  # groups dropped that K >= 1 replaces
        self.cut: set[str] = set()  # groups cut (`cut_stale`) and replaced already, until they are dropped
        self.ready: deque[Group] = deque()  # complete groups not trained yet (taken from the pool)
        self.requeue: list[str] = []  # task ids of groups to run again (`trainer.stale_groups: requeue`)
        self.resumed: dict[str, Group] = {}  # the saved rollouts of groups a resume completes, by group id
        self.rejected: set[int] = set()  # versions a canary rolled back (`lightning_ray.live.promotion`)

    # ------------------------------------------------------------------ admission

    def budget(self, version: int) -> int:
        """How many groups may have been started by the time the replicas serve `version`."""
        steps = version - self.first_version + self.max_staleness + 1
        return steps * self.batch_size + self.extra + self.replaced

    def top_up(self, version: int | None = None) -> None:
        """Start groups up to the budget of `version`, which the replicas now serve (None: the version they
        served at the last call); stale groups to re-run first, then new tasks. None starts on a version older
        than `floor` (`gathering`)."""
        with self.lock:
            self.serving = max(self.serving, version) if version is not None else self.serving
            n = self.budget(self.serving) - self.started
            if n <= 0 or self.serving < self.floor:  # `then` of the sync in progress starts them
                return
            again, self.requeue = self.requeue[:n], self.requeue[n:]
            self.call(self.pool.add_groups.remote(self.batch_id, n - len(again), again), "add_groups")
            self.started += n

    def resume(self, saved: SavedStream) -> None:
        """Continue a checkpointed stream: its complete untrained groups are trained first; the groups that
        were running run only their missing rollouts (under their own group ids, joined with the saved ones
        when they complete); the tasks of the groups to run whole start first in `top_up`."""
        self.ready.extend(saved.ready)
        self.requeue.extend(saved.in_flight)
        for part in saved.partial:
            missing = part.missing(self.cfg.algorithm.group_size)
            self.call(
                self.pool.resume_group.remote(self.batch_id, part.group_id, part.task_id, missing),
                "resume_group",
            )
            self.resumed[part.group_id] = part
        # started before the resume; in the budget like any group
        self.restored_rollouts = sum(len(g.records) for g in saved.ready + saved.partial)
        self.started += len(saved.ready) + len(saved.partial)

    # ------------------------------------------------------------------ batches

    def next_batch(
        self,
        version: int,
        on_group: Callable[[int, str | None], None] | None = None,
        check: Callable[[], None] | None = None,
    ) -> Batch:
        """The groups version `version` trains on (see the module docstring); blocks until they are complete.

        The batch's tables and records are the chosen groups'; its summary covers every group the step used
        up, dropped ones included, so failure rates count every rollout that ended; `dropped` holds the calls
        of the groups it did not choose (the run directory keeps them too). `on_group(chosen, reason)`
        is told about each group taken (reason None: chosen); `check()`, at each wait, raises what stops the
        run (the failure of a weight sync)."""
        t0 = time.perf_counter()
        self.gathering(version)
        chosen: list[Group] = []
        dropped: list[Group] = []
        ended: list[Any] = []
        consumed = 0  # K = 0: every complete group counts towards the batch, used or not
        while len(chosen) < self.batch_size and not (self.max_staleness == 0 and consumed >= self.batch_size):
            if not self.ready:
                self.top_up()
                self.workers.check()
                if check is not None:
                    check()
                self.take_complete(self.batch_size, WAIT_S)
                continue
            group = self.ready.popleft()
            consumed += 1
            ended += group.records
            reason = self.drop_reason(group, version)
            if reason is None:
                chosen.append(group)
            else:
                self.drop(group, reason, version)
                dropped.append(group)
            if on_group is not None:
                on_group(len(chosen), reason)
            if reason is not None and consumed >= self.batch_size and self.failing(ended):
                break  # K >= 1 would replace failed groups forever: the loop's failure-rate check stops here
        batch = self.as_batch(chosen, time.perf_counter() - t0)
        batch.summary = summarize_batch(ran(ended))
        batch.cut = self.cut_stale() if self.max_staleness else 0
        batch.dropped = pa.concat_tables([g.transitions for g in dropped]) if dropped else None
        used = [g.rollouts for g in chosen + dropped]
        batch.ended = rollout_records(ended, pa.concat_tables(used) if used else _empty("rollouts"))
        return batch

    def failing(self, ended: list[Any]) -> bool:
        """Whether more than `rollout.max_failure_rate` of the rollouts ended so far failed."""
        return summarize_batch(ran(ended)).failure_rate > self.cfg.rollout.max_failure_rate

    def gathering(self, version: int) -> None:
        """The batch of `version` is the next to take. With K >= 1, a group that starts now could only enter
        a batch after it (it would complete too late for this one), which accepts version `version + 1 - K` on:
        no group starts on an older one (`floor`). Only the overlapped sync (`weights.OverlappedSync`) leaves
        the replicas on an older version now, for the second it takes: a group started on it would be cut
        a step later (`cut_stale`), its generation thrown away. K = 0 waits for the groups started on
        `version` itself."""
        with self.lock:
            self.floor = version + 1 - self.max_staleness if self.max_staleness else version

    def cut_stale(self) -> int:
        """Once the batch being gathered is taken, no later batch can train a group with a call older than
        `floor`: end the running groups that have one now (`TaskPool.cut_groups`; the workers stop their
        rollouts) and start their replacements, rather than let them run to their end only to be dropped as
        stale. Returns how many groups it cut; they are dropped as `stale` when the stream takes them."""
        floor = self.floor
        stale = self.workers.stale_groups(self.batch_id, floor, self.cfg.rollout.train_agents)
        if not stale:
            return 0
        why = f"a call older than policy version {floor}"
        cut = self.call(self.pool.cut_groups.remote(self.batch_id, stale, "stale", why), "cut_groups")
        self.workers.cancel_groups(self.batch_id, cut)
        with self.lock:
            self.cut.update(cut)
            self.replaced += len(cut)
        self.top_up()  # on the version the replicas serve, or once they serve `floor`
        return len(cut)

    def take_complete(self, max_n: int | None, wait_s: float) -> None:
        """Move the pool's complete groups (up to `max_n`, waiting up to `wait_s`) to `ready`."""
        for entry in self.call(self.pool.wait_groups.remote(self.batch_id, max_n, wait_s), "wait_groups"):
            group = complete_group(entry)
            saved = self.resumed.pop(group.group_id, None)
            self.ready.append(saved.joined(group) if saved else group)

    def call(self, ref: ray.ObjectRef, what: str) -> Any:
        """The pool's answer, within the run's deadline; the pool's death is `TaskPoolLost`."""
        return get(ref, f"task pool {what}", self.cfg.trainer.stall_timeout_s, lost=TaskPoolLost)

    def drop_reason(self, group: Group, version: int) -> str | None:
        if cut := next(filter(None, map(cut_reason, group.records)), None):
            return cut
        versions = group.versions(self.cfg.rollout.train_agents)
        if versions & self.rejected:
            return "rolled_back"
        if versions and min(versions) < version - self.max_staleness:
            return "stale"
        if not any(r.status == "succeeded" for r in group.records):
            return "all_failed"
        if self.cfg.algorithm.drop_zero_variance and not group.has_signal():
            return "zero_variance"
        return None

    def drop(self, group: Group, reason: str, version: int) -> None:
        self.ledger.dropped(group.records, reason, version)
        with self.lock:
            if reason == "stale" and self.cfg.trainer.stale_groups == "requeue":
                self.requeue.append(group.task_id)
            if self.max_staleness > 0 and group.group_id not in self.cut:
                self.replaced += 1
            self.cut.discard(group.group_id)
        self.call(self.pool.forget_groups.remote(self.batch_id, [group.group_id]), "forget_groups")

    def as_batch(self, groups: list[Group], seconds: float) -> Batch:
        """The chosen groups as one batch (the ledger marks them trained when the loop has trained them)."""
        records = [r for g in groups for r in g.records]
        transitions = pa.concat_tables([g.transitions for g in groups]) if groups else _empty("transitions")
        rollouts = pa.concat_tables([g.rollouts for g in groups]) if groups else _empty("rollouts")
        if groups:
            self.call(
                self.pool.forget_groups.remote(self.batch_id, [g.group_id for g in groups]), "forget_groups"
            )
        return Batch(transitions, rollouts, records, summarize_batch(records), seconds)

    # ------------------------------------------------------------------ checkpoints and the end

    def save(self, out: Path) -> dict[str, Any]:
        """What `--resume` needs to continue the stream, written under `out`: the complete untrained groups, and
        the rollouts the running groups have finished (a resume runs only their missing ones). Returns the task
        ids of the groups to run whole (running with nothing finished yet, or queued to run again)."""
        self.take_complete(None, 0.0)
        partial, whole = [], list(self.requeue)
        for entry in self.call(self.pool.open_groups.remote(self.batch_id), "open_groups"):
            done = complete_group(entry) if entry["records"] else None
            saved = self.resumed.get(entry["group_id"])
            part = saved.joined(done) if saved and done else saved or done
            if part is None:
                whole.append(entry["task_id"])
            else:
                partial.append(part)
        out.mkdir(parents=True, exist_ok=True)
        _write_groups(out, "group", list(self.ready))
        _write_groups(out, "partial", partial)
        return {"in_flight": whole}

    def close(self, version: int) -> None:
        """Stop starting groups, cancel what has not started, let the workers finish what runs, and put every
        rollout that will not be trained in the ledger."""
        self.call(self.pool.close_batch.remote(self.batch_id, "run ended"), "close_batch")
        deadline = time.monotonic() + self.cfg.trainer.stall_timeout_s
        while not self.workers.finished(self.batch_id, timeout_s=WAIT_S):  # the dead are replaced
            if time.monotonic() > deadline:
                raise RunStalled(
                    f"closing the rollout stream: rollouts still running after {self.cfg.trainer.stall_timeout_s:.0f} s"
                )
        self.workers.release(self.batch_id)
        self.take_complete(None, 0.0)
        for group in self.ready:
            self.ledger.dropped(group.records, "run_ended", version)
        left = self.call(self.pool.batch_results.remote(self.batch_id), "batch_results")
        self.ledger.dropped(left, "run_ended", version, unstarted=True)
        self.call(self.pool.forget_batch.remote(self.batch_id), "forget_batch")


@dataclass
class SavedStream:
    """A checkpoint's stream: complete untrained groups, the finished part of running groups, and the task
    ids of groups to run whole."""

    ready: list[Group] = field(default_factory=list)
    partial: list[Group] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)


def load_stream(saved: Path, in_flight: list[str]) -> SavedStream:
    """What `RolloutStream.save` wrote under `saved` (nothing when it wrote nothing there)."""
    return SavedStream(_read_groups(saved, "group"), _read_groups(saved, "partial"), list(in_flight))


def _write_groups(out: Path, prefix: str, groups: list[Group]) -> None:
    """PREFIX-NNNN-TABLE.parquet per group, and the records of them all in PREFIXs.json."""
    for i, group in enumerate(groups):
        for name in GROUP_TABLES:
            pq.write_table(getattr(group, name), out / f"{prefix}-{i:04d}-{name}.parquet")
    (out / f"{prefix}s.json").write_text(json.dumps([[_plain(r) for r in g.records] for g in groups]))


def _read_groups(saved: Path, prefix: str) -> list[Group]:
    if not (saved / f"{prefix}s.json").is_file():
        return []
    groups = []
    for i, records in enumerate(json.loads((saved / f"{prefix}s.json").read_text())):
        tables = {name: pq.read_table(saved / f"{prefix}-{i:04d}-{name}.parquet") for name in GROUP_TABLES}
        restored = [RolloutRecord(**{**r, "history": tuple(r["history"]), "result": None}) for r in records]
        groups.append(Group(restored[0].group_id, restored[0].task_id, restored, **tables))
    return groups


def _plain(record: RolloutRecord) -> dict[str, Any]:
    """A record as JSON (its table refs do not outlive the run; the tables are saved beside it)."""
    return {k: v for k, v in dataclasses.asdict(record).items() if k != "result"}


def ran(records: list[Any]) -> list[Any]:
    """The records of rollouts that ran to an end of their own (not cut: a cut is no failure)."""
    return [r for r in records if not cut_reason(r)]


def _empty(name: str) -> pa.Table:
    return GROUP_TABLES[name].empty_table()
