"""The task pool as a plain class: the dataset's order, GRPO groups and the batches they belong to, on top of
the rollout life cycle of `LeaseQueue` (`leases.py`: queue, leases, retries, reports, one final state each).

A batch is made one of two ways:

- `start_batch(n)`: n groups drawn at once; done when every rollout is final (the synchronous loop).
- a stream: `open_batch()`, then `add_groups` whenever the driver wants more in flight. `close_batch` ends it:
  no more groups, queued rollouts abandoned, leased ones run to their end; it is done when they have ended.
  `cut_groups` ends groups the driver can no longer use (too stale to train) without waiting for them.

In both, a group whose last rollout reaches a final state (whatever its status) joins its batch's completion
queue, in completion order: `take_groups` hands complete groups out and `forget_groups` drops them once used,
so a stream that runs for a whole training run keeps only the groups in flight in memory.
"""

from __future__ import annotations

import itertools
import secrets
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_ray.tasks.dataset import Task
from lightning_ray.tasks.leases import LeaseQueue, RolloutState, new_id
from lightning_ray.tasks.order import TaskOrder
from lightning_ray.tasks.records import FINAL_STATUSES, RolloutRecord, RolloutStatus


@dataclass
class _Group:
    group_id: str
    task_id: str
    rollout_ids: list[str]
    remaining: int  # rollouts not final yet


@dataclass
class _Batch:
    batch_id: str
    group_size: int
    open: bool  # groups may still be added
    groups: dict[str, _Group] = field(default_factory=dict)  # in the order they were added
    completed: dict[str, None] = field(default_factory=dict)  # complete groups not taken, in completion order
    remaining: int = 0  # rollouts not final yet


class TaskPool(LeaseQueue):
    """Dataset position, GRPO groups and batches. See `leases.py` for the rollout life cycle."""

    def __init__(
        self,
        tasks: list[Task],
        *,
        group_size: int = 4,
        max_attempts: int = 2,
        lease_timeout_s: float = 300.0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if not tasks:
            raise ValueError("TaskPool needs at least one task")
        if group_size < 1:
            raise ValueError(f"group_size ({group_size}) must be >= 1")
        super().__init__(max_attempts=max_attempts, lease_timeout_s=lease_timeout_s)
        self.group_size = group_size
        self._order = TaskOrder(tasks, shuffle=shuffle, seed=seed)
        self._tasks = {t.task_id: t for t in tasks}
        self._batches: dict[str, _Batch] = {}
        # Cumulative, like the rollout counters of `LeaseQueue`: forgetting a batch or a group keeps them.
        self._batches_started = 0
        self._batches_done = 0
        self._groups_done = 0
        self._groups_queued = 0  # every group gets the next number: its `Lease.group_order`

    # ---- dataset position ------------------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        return len(self._order)

    def state(self) -> dict[str, Any]:
        """The data position after every group drawn so far. Save it with a checkpoint taken between steps;
        `load_state` on a pool over the same dataset then draws exactly the tasks that come next."""
        return self._order.state()

    def load_state(self, state: dict[str, Any]) -> None:
        self._order.load_state(state)

    def rewind(self) -> None:
        """Back to the dataset's first task (validation runs the same tasks each time)."""
        self._order.load_state({**self._order.state(), "epoch": 0, "cursor": 0})

    # ---- batches ---------------------------------------------------------------------------------------

    def start_batch(self, num_tasks: int, group_size: int | None = None) -> str:
        """Draw the next `num_tasks` tasks (cycling through epochs) and queue `group_size` rollouts of each,
        one GRPO group per task. Returns the batch id."""
        if num_tasks < 1:
            raise ValueError(f"num_tasks ({num_tasks}) must be >= 1")
        batch = self._new_batch(group_size, is_open=False)
        self._add_groups(batch, self._order.draw(num_tasks))
        return batch.batch_id

    def open_batch(self, group_size: int | None = None) -> str:
        """A stream: a batch with no groups yet, not done until `close_batch` (see the module docstring)."""
        return self._new_batch(group_size, is_open=True).batch_id

    def add_groups(self, batch_id: str, n: int, task_ids: Sequence[str] = ()) -> list[str]:
        """Queue new groups in an open batch: one for each of `task_ids` (those tasks run again; the data
        position does not move), then `n` of tasks drawn next from the data order, as `start_batch` draws
        them. Returns the new group ids, in that order."""
        batch = self._batch(batch_id)
        if not batch.open:
            raise ValueError(f"batch {batch_id} is closed: no groups can be added to it")
        if n < 0:
            raise ValueError(f"n ({n}) must be >= 0")
        unknown = [t for t in task_ids if t not in self._tasks]
        if unknown:
            raise KeyError(f"task ids not in this pool's dataset: {unknown!r}")
        return self._add_groups(batch, [self._tasks[t] for t in task_ids] + self._order.draw(n))

    def resume_group(self, batch_id: str, group_id: str, task_id: str, indices: Sequence[int]) -> None:
        """Queue the rollouts `indices` of a group a checkpoint saved unfinished, under its own `group_id`:
        the rollouts it had finished were saved with the checkpoint, and only the missing ones run again. The
        group completes when these have ended; the caller joins them with the saved ones."""
        batch = self._batch(batch_id)
        if not batch.open:
            raise ValueError(f"batch {batch_id} is closed: no groups can be added to it")
        if task_id not in self._tasks:
            raise KeyError(f"task id not in this pool's dataset: {task_id!r}")
        size = batch.group_size
        if group_id in batch.groups or not indices or not all(0 <= i < size for i in indices):
            raise ValueError(f"cannot resume group {group_id!r} with rollouts {list(indices)} of {size}")
        self._add_group(batch, self._tasks[task_id], group_id, indices)

    def _new_batch(self, group_size: int | None, *, is_open: bool) -> _Batch:
        group_size = self.group_size if group_size is None else group_size
        if group_size < 1:
            raise ValueError(f"group_size ({group_size}) must be >= 1")
        batch = _Batch(f"b{self._batches_started}-{secrets.token_hex(4)}", group_size, is_open)
        self._batches[batch.batch_id] = batch
        self._batches_started += 1
        return batch

    def _add_groups(self, batch: _Batch, tasks: list[Task]) -> list[str]:
        every = range(batch.group_size)
        return [self._add_group(batch, task, f"g-{secrets.token_hex(8)}", every) for task in tasks]

    def _add_group(self, batch: _Batch, task: Task, group_id: str, indices: Sequence[int]) -> str:
        """Queue the rollouts `indices` of one group of `task` (all of them for a new group)."""
        group = _Group(group_id, task.task_id, [new_id() for _ in indices], len(indices))
        batch.groups[group_id] = group
        batch.remaining += len(indices)
        order, self._groups_queued = self._groups_queued, self._groups_queued + 1
        for rid, i in zip(group.rollout_ids, indices, strict=True):
            self._add(RolloutState(rid, batch.batch_id, group_id, batch.group_size, i, task, order))
        return group_id

    def _batch(self, batch_id: str) -> _Batch:
        try:
            return self._batches[batch_id]
        except KeyError:
            raise KeyError(f"unknown batch {batch_id!r} (never started, or forgotten)") from None

    def _rollouts_of(self, batch: _Batch) -> Iterator[RolloutState]:
        return (self._rollouts[rid] for g in batch.groups.values() for rid in g.rollout_ids)

    def batch_done(self, batch_id: str) -> bool:
        """Whether every rollout of the batch is final and no more can be added to it."""
        batch = self._batch(batch_id)
        return not batch.open and batch.remaining == 0

    def batch_results(self, batch_id: str) -> list[RolloutRecord]:
        """Every rollout of the batch (its forgotten groups aside), group by group, in its current state."""
        return [self._record(r) for r in self._rollouts_of(self._batch(batch_id))]

    def groups(self, batch_id: str) -> list[dict[str, Any]]:
        return [
            {
                "group_id": g.group_id,
                "task_id": g.task_id,
                "rollout_ids": list(g.rollout_ids),
                "done": g.remaining == 0,
            }
            for g in self._batch(batch_id).groups.values()
        ]

    def close_batch(self, batch_id: str, reason: str = "batch closed") -> int:
        """No more groups: the rollouts still queued (none is running) end abandoned with `reason`, leased ones
        run to their end. Returns how many were abandoned; the groups that completes are queued as complete."""
        return self._close(batch_id, reason, lambda r: r.status is RolloutStatus.QUEUED)

    def cancel_batch(self, batch_id: str, reason: str = "batch cancelled") -> int:
        """Close the batch and abandon every rollout of it that is not final yet (a stopped run), leased ones
        too. Returns how many."""
        return self._close(batch_id, reason, lambda r: r.status not in FINAL_STATUSES)

    def _close(self, batch_id: str, reason: str, abandons: Callable[[RolloutState], bool]) -> int:
        batch = self._batch(batch_id)
        if batch.open:
            batch.open = False
            if batch.remaining == 0:
                self._batches_done += 1
        abandoned = [r for r in self._rollouts_of(batch) if abandons(r)]
        for r in abandoned:
            self._abandon(r, reason)
        return len(abandoned)

    def cut_groups(self, batch_id: str, group_ids: Sequence[str], reason: str, why: str) -> list[str]:
        """End groups that can no longer be used (e.g. too stale to train) before they complete: their
        queued and running rollouts end abandoned, marked cut for `reason`, which the ledger drops them for
        (they did not fail: `records.cut_reason`). Workers still running them learn at their next lease
        renewal, or at once from the driver (`RolloutWorker.cancel_groups`). Returns the groups cut; one
        already complete, or not in the batch, is left alone."""
        batch = self._batch(batch_id)
        cut = []
        for group in (batch.groups.get(g) for g in dict.fromkeys(group_ids)):
            if group is None or not group.remaining:
                continue
            for r in (self._rollouts[rid] for rid in group.rollout_ids):
                if r.status not in FINAL_STATUSES:
                    self._abandon(r, f"group cut: {why}", cut=reason)
            cut.append(group.group_id)
        return cut

    def forget_batch(self, batch_id: str) -> None:
        """Drop a done batch's records to bound memory; cumulative `stats()` still count it."""
        batch = self._batch(batch_id)
        if not self.batch_done(batch_id):
            state = "is still open" if batch.open else f"still has {batch.remaining} unfinished rollouts"
            raise ValueError(f"batch {batch_id} {state}; close or cancel it first")
        self._forget(batch, list(batch.groups.values()))
        del self._batches[batch_id]

    # ---- complete groups -------------------------------------------------------------------------------

    def take_groups(self, batch_id: str, max_n: int | None = None) -> list[dict[str, Any]]:
        """Take up to `max_n` (None: all) complete groups off the batch's completion queue, first completed
        first: each `{"group_id", "task_id", "records"}` with the final record of every rollout, in index order."""
        if max_n is not None and max_n < 1:
            raise ValueError(f"max_n ({max_n}) must be >= 1 or None")
        batch = self._batch(batch_id)
        taken = list(itertools.islice(batch.completed, max_n))
        out = []
        for group_id in taken:
            del batch.completed[group_id]
            group = batch.groups[group_id]
            records = [self._record(self._rollouts[rid]) for rid in group.rollout_ids]
            out.append({"group_id": group_id, "task_id": group.task_id, "records": records})
        return out

    def forget_groups(self, batch_id: str, group_ids: Sequence[str]) -> None:
        """Drop complete groups' rollouts and records (their results, e.g. table refs, go with them). Ids the
        batch does not hold (forgotten already, or restored from a checkpoint of another pool) are skipped."""
        batch = self._batch(batch_id)
        groups = [batch.groups[g] for g in dict.fromkeys(group_ids) if g in batch.groups]
        unfinished = [g.group_id for g in groups if g.remaining]
        if unfinished:
            raise ValueError(f"groups {unfinished!r} still have unfinished rollouts; only complete ones go")
        self._forget(batch, groups)

    def _forget(self, batch: _Batch, groups: list[_Group]) -> None:
        for group in groups:
            del batch.groups[group.group_id]
            batch.completed.pop(group.group_id, None)
            for rid in group.rollout_ids:
                del self._rollouts[rid]

    def open_groups(self, batch_id: str) -> list[dict[str, Any]]:
        """The batch's groups that are started and not complete (what a checkpoint saves to run again): each
        `{"group_id", "task_id", "records"}` with the records of the rollouts that have ended."""
        return [
            {
                "group_id": g.group_id,
                "task_id": g.task_id,
                "records": [
                    self._record(r)
                    for r in (self._rollouts[rid] for rid in g.rollout_ids)
                    if r.status in FINAL_STATUSES
                ],
            }
            for g in self._batch(batch_id).groups.values()
            if g.remaining
        ]

    def _ended(self, r: RolloutState) -> None:
        batch = self._batches[r.batch_id]
        group = batch.groups[r.group_id]
        group.remaining -= 1
        if group.remaining == 0:
            self._groups_done += 1
            batch.completed[group.group_id] = None
        batch.remaining -= 1
        if batch.remaining == 0 and not batch.open:
            self._batches_done += 1

    # ---- accounting ------------------------------------------------------------------------------------

    def stats(self, batch_id: str | None = None) -> dict[str, Any]:
        """Counts by status; `rollouts` always equals the sum of the six status counts.

        Without `batch_id`: cumulative over the pool's life (forgotten batches and groups included). With it:
        that batch's groups not forgotten.
        """
        if batch_id is None:
            by_status = {s.value: self._by_status[s] for s in RolloutStatus}
            out: dict[str, Any] = {
                "rollouts": self._created,
                **by_status,
                "failures_by_kind": dict(self._failures_by_kind),
                "leases_granted": self._leases_granted,
                "requeued": self._requeued,
                "batches": self._batches_started,
                "batches_done": self._batches_done,
                "groups_done": self._groups_done,
                "workers_alive": sum(w.alive and not w.retiring for w in self._workers.values()),
                "workers_dead": sum(not w.alive and not w.retiring for w in self._workers.values()),
                "workers_retired": sum(w.retiring for w in self._workers.values()),
                "workers_requested": self._workers_requested,
            }
        else:
            batch = self._batch(batch_id)
            rs = list(self._rollouts_of(batch))
            counts = Counter(r.status for r in rs)
            out = {
                "rollouts": len(rs),
                **{s.value: counts[s] for s in RolloutStatus},
                "failures_by_kind": dict(Counter(r.kind for r in rs if r.kind is not None)),
                "leases_granted": sum(r.attempt for r in rs),
                "groups": len(batch.groups),
                "groups_done": sum(g.remaining == 0 for g in batch.groups.values()),
                "done": self.batch_done(batch_id),
            }
        out["final"] = sum(out[s.value] for s in FINAL_STATUSES)
        return out
