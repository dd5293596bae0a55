"""Per-batch rollout summary: success rate, reward statistics, failures by kind, recurring failure patterns.

`summarize_batch` takes the final records of one batch (`RolloutRecord`s from `TaskPool.batch_results`, or
dicts with the same keys); `check_failure_rate` stops a run whose rollouts mostly fail, with the diagnosis in
the exception.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_ray.faults import RunFault
from lightning_ray.monitor.errors import Failure, FailureKind, message_template

ABANDONED = "abandoned"  # the pool gave up on the rollout (leases expired / workers died); not a Failure kind


@dataclass(frozen=True)
class FailurePattern:
    """Failures of one kind with the same exception type and message template."""

    kind: str
    exc_type: str | None
    template: str
    count: int
    example_message: str
    example_traceback: str
    example_rollout_id: str | None


@dataclass(frozen=True)
class BatchSummary:
    num_rollouts: int
    num_succeeded: int
    success_rate: float
    failure_rate: float
    reward_mean: float | None  # over succeeded rollouts that have a reward
    reward_std: float | None  # population std (ddof=0), as GRPO normalises groups
    num_rewarded: int
    by_status: dict[str, int]
    failures_by_kind: dict[str, int]
    patterns: list[FailurePattern] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def diagnosis(self, top: int = 3, traceback_lines: int = 12) -> str:
        """A readable account of what failed: kinds, then the most frequent patterns with an example."""
        failed = self.num_rollouts - self.num_succeeded
        lines = [
            f"{failed} of {self.num_rollouts} rollouts failed ({self.failure_rate:.1%})",
        ]
        if self.failures_by_kind:
            kinds = ", ".join(
                f"{k} {n}" for k, n in sorted(self.failures_by_kind.items(), key=lambda kv: -kv[1])
            )
            lines.append(f"failures by kind: {kinds}")
        if self.patterns:
            lines.append("most frequent failure patterns:")
        for i, p in enumerate(self.patterns[:top], start=1):
            what = f"{p.exc_type}: {p.template}" if p.exc_type else p.template
            lines.append(f"  {i}. [{p.kind}] {p.count}x {what}")
            if p.example_traceback:
                tail = p.example_traceback.rstrip().splitlines()[-traceback_lines:]
                lines.append(f"     example (rollout {p.example_rollout_id}):")
                lines.extend(f"       {line}" for line in tail)
            elif p.example_message and p.example_message != p.template:
                lines.append(f"     example: {p.example_message}")
        return "\n".join(lines)


class FailureRateExceeded(RunFault):
    """Too many rollouts of a batch failed: training on what is left would train on garbage."""

    def __init__(self, summary: BatchSummary, max_failure_rate: float) -> None:
        self.summary = summary
        self.max_failure_rate = max_failure_rate
        super().__init__(
            f"rollout failure rate {summary.failure_rate:.1%} exceeds rollout.max_failure_rate="
            f"{max_failure_rate:.1%}; stopping instead of training on failed rollouts.\n{summary.diagnosis()}"
        )


def _get(record: Any, key: str) -> Any:
    if isinstance(record, Mapping):
        return record.get(key)
    return getattr(record, key, None)


def _failure_of(record: Any) -> Failure:
    """The Failure of a non-succeeded record, whatever shape the report took."""
    status = _get(record, "status")
    raw = _get(record, "failure")
    if isinstance(raw, Failure):
        return raw
    if isinstance(raw, Mapping) and "kind" in raw:
        return Failure.from_dict(dict(raw))
    if status == "timed_out":
        return Failure(
            kind=FailureKind.TIMEOUT.value, message=str((raw or {}).get("message", "rollout timed out"))
        )
    if status == ABANDONED:
        reason = (raw or {}).get("reason", "abandoned") if isinstance(raw, Mapping) else "abandoned"
        return Failure(kind=ABANDONED, message=str(reason))
    return Failure(kind=_get(record, "kind") or FailureKind.AGENT_EXCEPTION.value, message=str(raw or ""))


def summarize_batch(records: Iterable[Any]) -> BatchSummary:
    """Summarise final rollout records: objects or mappings with `status`, `reward`, `kind`, `failure`
    (a Failure, its dict, or the pool's `{"reason": ...}`) and `rollout_id`."""
    records = list(records)
    by_status = Counter(str(_get(r, "status")) for r in records)
    succeeded = [r for r in records if _get(r, "status") == "succeeded"]
    rewards = [float(_get(r, "reward")) for r in succeeded if _get(r, "reward") is not None]
    mean = math.fsum(rewards) / len(rewards) if rewards else None
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in rewards) / len(rewards)) if mean is not None else None

    failures_by_kind: Counter[str] = Counter()
    groups: dict[tuple[str, str | None, str], list[tuple[Any, Failure]]] = {}
    for r in records:
        if _get(r, "status") == "succeeded":
            continue
        failure = _failure_of(r)
        failures_by_kind[failure.kind] += 1
        key = (failure.kind, failure.exc_type, message_template(failure.message))
        groups.setdefault(key, []).append((r, failure))

    patterns = []
    for (kind, exc_type, template), members in groups.items():
        # The example: the first one that has a traceback, else the first.
        example_record, example = next(((r, f) for r, f in members if f.traceback), members[0])
        patterns.append(
            FailurePattern(
                kind=kind,
                exc_type=exc_type,
                template=template,
                count=len(members),
                example_message=example.message,
                example_traceback=example.traceback,
                example_rollout_id=_get(example_record, "rollout_id"),
            )
        )
    patterns.sort(key=lambda p: (-p.count, p.kind, p.template))
    n = len(records)
    return BatchSummary(
        num_rollouts=n,
        num_succeeded=len(succeeded),
        success_rate=len(succeeded) / n if n else 0.0,
        failure_rate=(n - len(succeeded)) / n if n else 0.0,
        reward_mean=mean,
        reward_std=std,
        num_rewarded=len(rewards),
        by_status=dict(by_status),
        failures_by_kind=dict(failures_by_kind),
        patterns=patterns,
    )


def check_failure_rate(summary: BatchSummary, max_failure_rate: float) -> None:
    """Raise FailureRateExceeded when more than `max_failure_rate` (config: rollout.max_failure_rate) of
    the batch failed. An empty batch passes: there is nothing to judge."""
    if summary.num_rollouts and summary.failure_rate > max_failure_rate:
        raise FailureRateExceeded(summary, max_failure_rate)
