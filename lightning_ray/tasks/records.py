"""What crosses the task pool's boundary: a rollout's statuses, the lease a worker gets, the report it sends
back, and the record the pool keeps. Workers and the driver use these without the pool's logic (`pool.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class RolloutStatus(StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    ABANDONED = "abandoned"


FINAL_STATUSES = frozenset(
    {RolloutStatus.SUCCEEDED, RolloutStatus.FAILED, RolloutStatus.TIMED_OUT, RolloutStatus.ABANDONED}
)
REPORTABLE_STATUSES = frozenset({RolloutStatus.SUCCEEDED, RolloutStatus.FAILED, RolloutStatus.TIMED_OUT})


class WorkerDeadError(RuntimeError):
    """A worker that was reported dead asked for work; it must register again under a new id."""


@dataclass(frozen=True)
class Lease:
    """One rollout handed to a worker. Report it with `complete(rollout_id, attempt, ...)` before
    `expires_at` (wall-clock seconds), or extend it with `renew`."""

    rollout_id: str
    attempt: int
    batch_id: str
    group_id: str
    group_size: int
    index_in_group: int
    task_id: str
    task: dict[str, Any]
    expires_at: float
    group_order: int = 0  # the group's place in the order its pool queued groups: its calls' engine priority


@dataclass(frozen=True)
class RolloutReport:
    """How attempt `attempt` of a rollout ended, as its worker reports it: the arguments of `TaskPool.complete`."""

    rollout_id: str
    attempt: int
    status: str
    kind: str | None = None
    reward: float | None = None
    failure: dict[str, Any] | None = None
    retry: bool = False  # a failure that was not the agent's doing (`RETRIED_KINDS`): run it again


@dataclass(frozen=True)
class RolloutRecord:
    """The pool's record of one rollout: its one final state once it ended (its current state before)."""

    rollout_id: str
    batch_id: str
    group_id: str
    index_in_group: int
    task_id: str
    status: str
    attempts: int
    worker_id: str | None
    kind: str | None
    reward: float | None
    failure: dict[str, Any] | None
    result: Any
    history: tuple[dict[str, Any], ...]


def cut_reason(record: Any) -> str | None:
    """Why the driver cut the rollout's group before the rollout ended (`TaskPool.cut_groups`), or None: a
    cut rollout is abandoned, but it is dropped for this reason, not failed."""
    failure = record.failure
    if record.status == RolloutStatus.ABANDONED and isinstance(failure, dict):
        return failure.get("cut")
    return None
