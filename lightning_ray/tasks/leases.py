"""The life cycle of a rollout, below groups and batches: the queue, workers, leases, retries and reports.

Life of a rollout: `queued` -> `leased` (a worker holds it until a deadline) -> one final state:

- `succeeded` / `failed` (with a kind) / `timed_out`: reported by the worker through `complete()`;
- `abandoned`: its lease expired or its worker died and it had used all `max_attempts`, or its batch was
  cancelled (or closed before it was handed out), or its group was cut (`TaskPool.cut_groups`).

An expired lease or a dead worker's lease goes back to the *front* of the queue (so a batch finishes soon)
while attempts remain. Every lease carries an attempt number; a `complete()` from an older attempt is
ignored, and a repeated one is a no-op, so workers may retry their reports freely. Not thread-safe: the Ray
actor wrapper (`actor.py`) calls it from one event loop. Deadlines use the monotonic clock.

`LeaseQueue` is the base of `TaskPool` (`pool.py`), which makes the rollouts (groups of a batch) and is told
through `_ended` when each one reaches its final state.
"""

from __future__ import annotations

import secrets
import time
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_ray.tasks.dataset import Task
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
class RolloutState:
    """The pool's mutable state of one rollout (`RolloutRecord` is its frozen copy for callers)."""

    rollout_id: str
    batch_id: str
    group_id: str
    group_size: int
    index_in_group: int
    task: Task
    group_order: int = 0
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
class _Worker:
    handle: Any
    alive: bool = True
    reason: str = ""
    held: set[str] = field(default_factory=set)
    retiring: bool = False  # scaled down: finishes what it holds, leases nothing more


def new_id() -> str:
    """Unguessable: rollout ids appear in gateway URLs, which must not be addressable by guessing."""
    return secrets.token_urlsafe(16)


class LeaseQueue(ABC):
    """Rollouts, the queue they wait in, the workers that lease them and how each attempt ended."""

    def __init__(self, *, max_attempts: int, lease_timeout_s: float) -> None:
        if max_attempts < 1 or lease_timeout_s <= 0:
            raise ValueError(
                f"max_attempts ({max_attempts}) must be >= 1, lease_timeout_s ({lease_timeout_s}) > 0"
            )
        self.max_attempts = max_attempts
        self.lease_timeout_s = lease_timeout_s
        self._rollouts: dict[str, RolloutState] = {}
        self._queue: deque[str] = deque()
        self._workers: dict[str, _Worker] = {}
        self._workers_requested: int | None = None  # `lightning-ray scale`; None: queue depth decides
        # Cumulative counters outlive the rollouts they counted, so `stats()` adds up over the whole run.
        self._by_status: Counter[str] = Counter()
        self._failures_by_kind: Counter[str] = Counter()
        self._created = 0
        self._leases_granted = 0
        self._requeued = 0

    def _add(self, r: RolloutState) -> None:
        """A new rollout, queued behind the others."""
        self._rollouts[r.rollout_id] = r
        self._queue.append(r.rollout_id)
        self._created += 1
        self._by_status[RolloutStatus.QUEUED] += 1

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

    def request_workers(self, n: int | None) -> None:
        """How many rollout workers the run should have (`lightning-ray scale`), or None to scale on queue
        depth again. The driver reads it with `stats()`; the pool only keeps it, as the run's named actor."""
        if n is not None and n < 1:
            raise ValueError(f"a run needs at least one rollout worker, not {n}")
        self._workers_requested = n

    def retire_worker(self, worker_id: str) -> None:
        """The worker leases nothing more (an elastic run scales it down); what it holds it still finishes and
        reports. Its leases are only revoked if it dies, as any worker's are."""
        self._worker(worker_id).retiring = True

    def retiring(self, worker_id: str) -> bool:
        w = self._workers.get(worker_id)
        return w is not None and w.retiring

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
        if w.retiring:
            return leases
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
            leases.append(
                Lease(
                    rollout_id=r.rollout_id,
                    attempt=r.attempt,
                    batch_id=r.batch_id,
                    group_id=r.group_id,
                    group_size=r.group_size,
                    index_in_group=r.index_in_group,
                    task_id=r.task.task_id,
                    task=r.task.data,
                    expires_at=time.time() + self.lease_timeout_s,
                    group_order=r.group_order,
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

    def _release(self, r: RolloutState, event: str) -> None:
        """Take the rollout away from its worker, noting why in its history."""
        if r.worker_id is not None:
            w = self._workers.get(r.worker_id)
            if w is not None:
                w.held.discard(r.rollout_id)
        r.history.append(
            {"attempt": r.attempt, "worker_id": r.worker_id, "event": event, "time": time.time()}
        )
        r.deadline = None

    def _revoke(self, r: RolloutState, reason: str) -> None:
        self._release(r, reason)
        if r.attempt < self.max_attempts:
            self._requeue(r)
        else:
            self._finish(
                r,
                RolloutStatus.ABANDONED,
                failure={"reason": f"{reason}; all {self.max_attempts} attempts used"},
            )

    def _requeue(self, r: RolloutState) -> None:
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
                retry=r.retry,
            )
            for r in reports
        ]

    def _set_status(self, r: RolloutState, status: RolloutStatus) -> None:
        self._by_status[r.status] -= 1
        self._by_status[status] += 1
        r.status = status

    def _finish(
        self,
        r: RolloutState,
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
        self._ended(r)

    def _abandon(self, r: RolloutState, reason: str, cut: str | None = None) -> None:
        """End a rollout that is not final yet as abandoned (its batch was cancelled or closed, or with `cut`
        its group was cut: `TaskPool.cut_groups`)."""
        self._release(r, reason)
        failure = {"reason": reason} | ({"cut": cut} if cut else {})
        self._finish(r, RolloutStatus.ABANDONED, failure=failure)

    @abstractmethod
    def _ended(self, r: RolloutState) -> None:
        """The rollout just reached its one final state: keep the books of its group and batch."""

    def _record(self, r: RolloutState) -> RolloutRecord:
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
