"""How one attempt of a rollout ends up in the pool: its recorded calls, rewards and failure become a
`FinishedRollout`, and that the `RolloutReport` the pool completes it with.

In-cluster workers (`rollouts/worker.py`) and the remote runners' task API (`lightning_ray.runners`) end rollouts
through the same two functions, so a rollout reads the same in the tables and the ledger whoever ran it.
"""

from __future__ import annotations

from collections import defaultdict

from lightning_ray.agent.rewards import EmittedReward, rollout_reward
from lightning_ray.data.schema import FinishedRollout, Transition
from lightning_ray.monitor.errors import RETRIED_KINDS, Failure, classify_outcome
from lightning_ray.rollouts.capture import masked
from lightning_ray.tasks.records import Lease, RolloutReport


def credit_emitted(transitions: list[Transition], emitted: list[EmittedReward]) -> None:
    """Per-call rewards: an emitted reward is credited to the LLM call it follows (summed per call)."""
    per_call: dict[int, float] = defaultdict(float)
    for r in emitted:
        if r.call_index is not None:
            per_call[r.call_index] += r.value
    for t in transitions:
        if t.call_index in per_call:
            t.reward = per_call[t.call_index]


def reward_dims(emitted: list[EmittedReward]) -> dict[str, float]:
    dims: dict[str, float] = defaultdict(float)
    for r in emitted:
        for k, v in r.dims.items():
            dims[k] += v
    return dict(dims)


def finished_rollout(
    lease: Lease,
    transitions: list[Transition],
    emitted: list[EmittedReward],
    ending: Failure | float | None,
    *,
    duration_s: float,
    worker: str,
    logs: str,
    secret: str | None,
) -> FinishedRollout:
    """One attempt's end. `ending` is the Failure that ended it, or the reward the agent returned (None for
    none): without a failure the rollout succeeds if it has a reward, returned or emitted, else it fails as
    `classify_outcome` says (`no_reward`, or `truncated_context` after a cut-off last call). `secret` (the
    gateway's token) is masked in the logs and the error."""
    credit_emitted(transitions, emitted)
    if isinstance(ending, Failure):
        failure, reward = ending, None
    else:
        reward = rollout_reward(ending, emitted)
        last = transitions[-1].finish_reason if transitions else None
        failure = classify_outcome(reward=reward, last_finish_reason=last)
    return FinishedRollout(
        rollout_id=lease.rollout_id,
        task_id=lease.task_id,
        group_id=lease.group_id,
        attempt=lease.attempt,
        status="succeeded" if failure is None else failure.status,
        transitions=transitions,
        reward=reward,
        reward_dims=reward_dims(emitted),
        failure_kind=failure.kind if failure else None,
        error_type=failure.exc_type if failure else None,
        error_message=masked(failure.message, secret) if failure else None,
        traceback=masked(failure.traceback, secret) if failure else None,
        duration_s=duration_s,
        worker=worker,
        logs=masked(logs, secret) or "",
    )


def report_of(r: FinishedRollout) -> RolloutReport:
    """What the pool completes the attempt with; a failure that was not the agent's doing is run again."""
    failure = None
    if r.status != "succeeded":
        failure = {
            "kind": r.failure_kind,
            "exc_type": r.error_type,
            "message": r.error_message or "",
            "traceback": r.traceback or "",
        }
    retry = r.failure_kind in RETRIED_KINDS
    return RolloutReport(r.rollout_id, r.attempt, r.status, r.failure_kind, r.reward, failure, retry)
