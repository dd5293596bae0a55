"""The task pool's logic as a plain class: groups, leases, retries and the one final state of each rollout.

Life of a rollout: `queued` -> `leased` (a worker holds it until a deadline) -> one final state:

- `succeeded` / `failed` (with a kind) / `timed_out`: reported by the worker through `complete()`;
- `abandoned`: its lease expired or its worker died and it had used all `max_attempts`, or its batch was
  cancelled.

An expired lease or a dead worker's lease goes back to the *front* of the queue (so a batch finishes soon)
while attempts remain. Every lease carries an attempt number; a `complete()` from an older attempt is
ignored, and a repeated one is a no-op, so workers may retry their reports freely. The class is not thread-
safe: the Ray actor wrapper (`actor.py`) calls it from one event loop. Deadlines use the monotonic clock.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_ray.tasks.dataset import Task
from lightning_ray.tasks.order import TaskOrder
from lightning_ray.tasks.records import (
    FINAL_STATUSES,
    REPORTABLE_STATUSES,
    Lease,
    RolloutRecord,
    RolloutReport,
    RolloutStatus,
    WorkerDeadError,
)


@dataclass
class _Rollout:
    rollout_id: str
    batch_id: str
    group_id: str
    index_in_group: int
    task: Task
    status: RolloutStatus = RolloutStatus.QUEUED
    attempt: int = 0
    worker_id: str | None = None
    deadline: float | None = None
    reported_attempt: int | None = None  # the latest attempt a complete() was accepted for
    kind: str | None = None
    reward: float | None = None
    failure: dict[str, Any] | None = None
    result: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Group:
    group_id: str
    batch_id: str
    task_id: str
    rollout_ids: list[str]
    remaining: int


@dataclass
class _Batch:
    batch_id: str
    group_ids: list[str]
    rollout_ids: list[str]
    remaining: int


@dataclass
class _Worker:
    handle: Any
    alive: bool = True
    reason: str = ""
    held: set[str] = field(default_factory=set)


def _new_id() -> str:
    """Unguessable: rollout ids appear in gateway URLs, which must not be addressable by guessing."""
    return secrets.token_urlsafe(16)


class TaskPool:
    """Dataset position, GRPO groups and leases. See the module docstring for the rollout life cycle."""

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
        if group_size < 1 or max_attempts < 1 or lease_timeout_s <= 0:
            raise ValueError(
                f"group_size ({group_size}) and max_attempts ({max_attempts}) must be >= 1, "
                f"lease_timeout_s ({lease_timeout_s}) > 0"
            )
        self.group_size = group_size
        self.max_attempts = max_attempts
        self.lease_timeout_s = lease_timeout_s
        self._order = TaskOrder(tasks, shuffle=shuffle, seed=seed)
        self._rollouts: dict[str, _Rollout] = {}
        self._groups: dict[str, _Group] = {}
        self._batches: dict[str, _Batch] = {}
        self._queue: deque[str] = deque()
        self._workers: dict[str, _Worker] = {}
        # Cumulative counters survive `forget_batch`, so `stats()` adds up over the whole run.
        self._by_status: Counter[str] = Counter()
        self._failures_by_kind: Counter[str] = Counter()
        self._created = 0
        self._leases_granted = 0
        self._requeued = 0
        self._batches_started = 0
        self._batches_done = 0
        self._groups_done = 0

    # ---- dataset position ------------------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        return len(self._order)

    def state(self) -> dict[str, Any]:
        """The data position after every batch started so far. Save it with a checkpoint taken between
        steps; `load_state` on a pool over the same dataset then draws exactly the tasks that come next."""
        return self._order.state()

    def load_state(self, state: dict[str, Any]) -> None:
        self._order.load_state(state)

    # ---- batches and groups ----------------------------------------------------------------------------

    def start_batch(self, num_tasks: int, group_size: int | None = None) -> str:
        """Draw the next `num_tasks` tasks (cycling through epochs) and queue `group_size` rollouts of each,
        one GRPO group per task. Returns the batch id."""
        group_size = self.group_size if group_size is None else group_size
        if num_tasks < 1 or group_size < 1:
            raise ValueError(f"num_tasks ({num_tasks}) and group_size ({group_size}) must be >= 1")
        batch_id = f"b{self._batches_started}-{secrets.token_hex(4)}"
        batch = _Batch(batch_id=batch_id, group_ids=[], rollout_ids=[], remaining=0)
        for task in self._order.draw(num_tasks):
            group_id = f"g-{secrets.token_hex(8)}"
            rollout_ids = [_new_id() for _ in range(group_size)]
            self._groups[group_id] = _Group(
                group_id, batch_id, task.task_id, rollout_ids, remaining=group_size
            )
            for i, rid in enumerate(rollout_ids):
                self._rollouts[rid] = _Rollout(rid, batch_id, group_id, i, task)
                self._queue.append(rid)
            batch.group_ids.append(group_id)
            batch.rollout_ids.extend(rollout_ids)
        batch.remaining = len(batch.rollout_ids)
        self._batches[batch_id] = batch
        self._batches_started += 1
        self._created += batch.remaining
        self._by_status[RolloutStatus.QUEUED] += batch.remaining
        return batch_id

    def _batch(self, batch_id: str) -> _Batch:
        try:
            return self._batches[batch_id]
        except KeyError:
            raise KeyError(f"unknown batch {batch_id!r} (never started, or forgotten)") from None

    def batch_done(self, batch_id: str) -> bool:
        return self._batch(batch_id).remaining == 0

    def batch_results(self, batch_id: str) -> list[RolloutRecord]:
        """Every rollout of the batch, group by group, in its current (final once the batch is done) state."""
        return [self._record(self._rollouts[rid]) for rid in self._batch(batch_id).rollout_ids]

    def groups(self, batch_id: str) -> list[dict[str, Any]]:
        return [
            {
                "group_id": g.group_id,
                "task_id": g.task_id,
                "rollout_ids": list(g.rollout_ids),
                "done": g.remaining == 0,
            }
            for g in (self._groups[gid] for gid in self._batch(batch_id).group_ids)
        ]

    def cancel_batch(self, batch_id: str, reason: str = "batch cancelled") -> int:
        """Abandon every rollout of the batch that is not final yet (a stopped run). Returns how many."""
        n = 0
        for rid in self._batch(batch_id).rollout_ids:
            r = self._rollouts[rid]
            if r.status not in FINAL_STATUSES:
                self._release(r, reason)
                self._finish(r, RolloutStatus.ABANDONED, failure={"reason": reason})
                n += 1
        return n

    def forget_batch(self, batch_id: str) -> None:
        """Drop a finished batch's records to bound memory; cumulative `stats()` still count it."""
        batch = self._batch(batch_id)
        if batch.remaining:
            raise ValueError(
                f"batch {batch_id} still has {batch.remaining} unfinished rollouts; cancel it first"
            )
        for gid in batch.group_ids:
            del self._groups[gid]
        for rid in batch.rollout_ids:
            del self._rollouts[rid]
        del self._batches[batch_id]

    # ---- workers and leases ----------------------------------------------------------------------------

    def register_worker(self, worker_id: str, handle: Any = None) -> None:
        """Make a worker known (with its actor handle, so the actor wrapper can ping it)."""
        w = self._workers.get(worker_id)
        if w is not None and not w.alive:
            raise WorkerDeadError(
                f"worker {worker_id} was reported dead ({w.reason}); register under a new id"
            )
        if w is None:
            self._workers[worker_id] = _Worker(handle=handle)
        elif handle is not None:
            w.handle = handle

    def worker_handles(self) -> dict[str, Any]:
        """Handles of the workers believed alive, for liveness pings."""
        return {wid: w.handle for wid, w in self._workers.items() if w.alive and w.handle is not None}

    def report_worker_dead(self, worker_id: str, reason: str = "reported dead") -> list[str]:
        """Revoke every lease the worker holds; returns the rollout ids it held."""
        w = self._workers.setdefault(worker_id, _Worker(handle=None))
        if not w.alive:
            return []
        w.alive, w.reason = False, reason
        held = sorted(w.held)
        for rid in held:
            self._revoke(self._rollouts[rid], f"worker {worker_id} died: {reason}")
        return held

    def _worker(self, worker_id: str) -> _Worker:
        w = self._workers.get(worker_id)
        if w is None:
            self.register_worker(worker_id)
            w = self._workers[worker_id]
        if not w.alive:
            raise WorkerDeadError(
                f"worker {worker_id} was reported dead ({w.reason}); register under a new id"
            )
        return w

    def lease(self, worker_id: str, max_n: int = 1, now: float | None = None) -> list[Lease]:
        """Hand up to `max_n` queued rollouts to the worker (retries first, then in group order)."""
        w = self._worker(worker_id)
        now = time.monotonic() if now is None else now
        self.expire_leases(now)
        leases: list[Lease] = []
        while self._queue and len(leases) < max_n:
            r = self._rollouts.get(self._queue.popleft())
            if r is None or r.status is not RolloutStatus.QUEUED:
                continue  # finished by a late report while queued, or forgotten
            r.attempt += 1
            r.worker_id = worker_id
            r.deadline = now + self.lease_timeout_s
            self._set_status(r, RolloutStatus.LEASED)
            w.held.add(r.rollout_id)
            self._leases_granted += 1
            group = self._groups[r.group_id]
            leases.append(
                Lease(
                    rollout_id=r.rollout_id,
                    attempt=r.attempt,
                    batch_id=r.batch_id,
                    group_id=r.group_id,
                    group_size=len(group.rollout_ids),
                    index_in_group=r.index_in_group,
                    task_id=r.task.task_id,
                    task=r.task.data,
                    expires_at=time.time() + self.lease_timeout_s,
                )
            )
        return leases

    def renew(self, worker_id: str, leases: list[tuple[str, int]], now: float | None = None) -> list[str]:
        """Extend the worker's leases given as (rollout_id, attempt); returns the ids it still holds (the
        others were revoked or finished: stop working on them)."""
        w = self._worker(worker_id)
        now = time.monotonic() if now is None else now
        self.expire_leases(now)
        held = []
        for rid, attempt in leases:
            r = self._rollouts.get(rid)
            if r is not None and r.status is RolloutStatus.LEASED and r.attempt == attempt and rid in w.held:
                r.deadline = now + self.lease_timeout_s
                held.append(rid)
        return held

    def expire_leases(self, now: float | None = None) -> list[str]:
        """Revoke every lease past its deadline; returns their rollout ids."""
        now = time.monotonic() if now is None else now
        expired = [
            r
            for w in self._workers.values()
            for r in (self._rollouts[rid] for rid in w.held)
            if r.deadline is not None and r.deadline < now
        ]
        for r in expired:
            self._revoke(r, f"lease expired (worker {r.worker_id}, {self.lease_timeout_s:g}s)")
        return [r.rollout_id for r in expired]

    def _release(self, r: _Rollout, event: str) -> None:
        """Take the rollout away from its worker, noting why in its history."""
        if r.worker_id is not None:
            w = self._workers.get(r.worker_id)
            if w is not None:
                w.held.discard(r.rollout_id)
        r.history.append(
            {"attempt": r.attempt, "worker_id": r.worker_id, "event": event, "time": time.time()}
        )
        r.deadline = None

    def _revoke(self, r: _Rollout, reason: str) -> None:
        self._release(r, reason)
        if r.attempt < self.max_attempts:
            self._requeue(r)
        else:
            self._finish(
                r,
                RolloutStatus.ABANDONED,
                failure={"reason": f"{reason}; all {self.max_attempts} attempts used"},
            )

    def _requeue(self, r: _Rollout) -> None:
        self._set_status(r, RolloutStatus.QUEUED)
        self._queue.appendleft(r.rollout_id)
        self._requeued += 1

    # ---- reports ---------------------------------------------------------------------------------------

    def complete(
        self,
        rollout_id: str,
        attempt: int,
        status: str,
        *,
        kind: str | None = None,
        reward: float | None = None,
        failure: dict[str, Any] | None = None,
        result: Any = None,
        retry: bool = False,
    ) -> str:
        """Record how attempt `attempt` of a rollout ended.

        `status` is succeeded, failed (needs `kind`, e.g. "agent_exception") or timed_out. With `retry=True`
        a failed/timed-out rollout is queued again if attempts remain. `failure` is a JSON-able description
        (see `lightning_ray.monitor.errors.Failure.to_dict`); `result` is kept as is (e.g. an ObjectRef).

        Returns "accepted", "requeued", "duplicate" (this attempt already reported: nothing changed),
        "stale" (a newer attempt exists, or the rollout already ended otherwise) or "unknown".
        """
        status = RolloutStatus(status)
        if status not in REPORTABLE_STATUSES:
            raise ValueError(f"a worker reports succeeded, failed or timed_out, not {status}")
        if status is RolloutStatus.FAILED and not kind:
            raise ValueError("a failed rollout needs a kind, e.g. 'agent_exception'")
        r = self._rollouts.get(rollout_id)
        if r is None:
            return "unknown"
        if r.reported_attempt == attempt:
            return "duplicate"
        if r.status in FINAL_STATUSES or attempt != r.attempt:
            return "stale"
        # The current attempt: normally still leased; possibly revoked and queued again, but not yet handed
        # out, in which case the late report is still the newest work on it and is kept.
        if r.status is RolloutStatus.LEASED:
            self._release(r, f"reported {status}" + (f" ({kind})" if kind else ""))
        r.reported_attempt = attempt
        if retry and status is not RolloutStatus.SUCCEEDED and r.attempt < self.max_attempts:
            r.history[-1]["failure"] = failure
            if r.status is not RolloutStatus.QUEUED:
                self._requeue(r)
            return "requeued"
        if status is RolloutStatus.TIMED_OUT:
            kind = kind or "timeout"
        self._finish(
            r,
            status,
            kind=kind if status is not RolloutStatus.SUCCEEDED else None,
            reward=reward,
            failure=failure,
            result=result,
        )
        return "accepted"

    def complete_all(self, reports: Sequence[RolloutReport], result: Any = None) -> list[str]:
        """`complete` each report, all with the same `result` (e.g. the tables of the group they ran in); returns
        `complete`'s answer for each."""
        return [
            self.complete(
                r.rollout_id,
                r.attempt,
                r.status,
                kind=r.kind,
                reward=r.reward,
                failure=r.failure,
                result=result,
            )
            for r in reports
        ]

    def _set_status(self, r: _Rollout, status: RolloutStatus) -> None:
        self._by_status[r.status] -= 1
        self._by_status[status] += 1
        r.status = status

    def _finish(
        self,
        r: _Rollout,
        status: RolloutStatus,
        *,
        kind: str | None = None,
        reward: float | None = None,
        failure: dict[str, Any] | None = None,
        result: Any = None,
    ) -> None:
        self._set_status(r, status)
        r.kind, r.reward, r.failure, r.result, r.deadline = kind, reward, failure, result, None
        if kind is not None:
            self._failures_by_kind[kind] += 1
        group = self._groups[r.group_id]
        group.remaining -= 1
        if group.remaining == 0:
            self._groups_done += 1
        batch = self._batches[r.batch_id]
        batch.remaining -= 1
        if batch.remaining == 0:
            self._batches_done += 1

    def _record(self, r: _Rollout) -> RolloutRecord:
        return RolloutRecord(
            rollout_id=r.rollout_id,
            batch_id=r.batch_id,
            group_id=r.group_id,
            index_in_group=r.index_in_group,
            task_id=r.task.task_id,
            status=str(r.status),
            attempts=r.attempt,
            worker_id=r.worker_id,
            kind=r.kind,
            reward=r.reward,
            failure=r.failure,
            result=r.result,
            history=tuple(dict(h) for h in r.history),
        )

    # ---- accounting ------------------------------------------------------------------------------------

    def stats(self, batch_id: str | None = None) -> dict[str, Any]:
        """Counts by status; `rollouts` always equals the sum of the six status counts.

        Without `batch_id`: cumulative over the pool's life (forgotten batches included). With it: that batch.
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
                "workers_alive": sum(w.alive for w in self._workers.values()),
                "workers_dead": sum(not w.alive for w in self._workers.values()),
            }
        else:
            batch = self._batch(batch_id)
            rs = [self._rollouts[rid] for rid in batch.rollout_ids]
            counts = Counter(r.status for r in rs)
            out = {
                "rollouts": len(rs),
                **{s.value: counts[s] for s in RolloutStatus},
                "failures_by_kind": dict(Counter(r.kind for r in rs if r.kind is not None)),
                "leases_granted": sum(r.attempt for r in rs),
                "groups": len(batch.group_ids),
                "groups_done": sum(self._groups[g].remaining == 0 for g in batch.group_ids),
                "done": batch.remaining == 0,
            }
        out["final"] = sum(out[s.value] for s in FINAL_STATUSES)
        return out
