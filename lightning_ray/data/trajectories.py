"""Finished rollouts -> Arrow tables in the object store and Parquet in the run directory.

Two tables per group: `transitions` (one row per LLM call, TRANSITION_SCHEMA, what the learner trains on)
and `rollouts` (one row per rollout, failed ones included, with the error, logs and final state). Workers
`ray.put` them; the driver concatenates object refs with `pa.concat_tables`, never through Python rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from lightning_ray.data.schema import TRANSITION_SCHEMA, Transition

ROLLOUT_SCHEMA = pa.schema(
    [
        pa.field("rollout_id", pa.string(), nullable=False),
        pa.field("task_id", pa.string(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("attempt", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("failure_kind", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("traceback", pa.string()),
        pa.field("reward", pa.float64()),
        pa.field("reward_dims", pa.map_(pa.string(), pa.float64())),
        pa.field("num_calls", pa.int32(), nullable=False),
        pa.field("duration_s", pa.float64()),
        pa.field("worker", pa.string()),
        pa.field("logs", pa.string()),
    ]
)


@dataclass
class RolloutResult:
    """Everything a rollout produced, as the worker hands it on."""

    rollout_id: str
    task_id: str
    group_id: str
    attempt: int
    status: str
    transitions: list[Transition] = field(default_factory=list)
    reward: float | None = None
    reward_dims: dict[str, float] = field(default_factory=dict)
    failure_kind: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    duration_s: float = 0.0
    worker: str = ""
    logs: str = ""


def transitions_table(results: Iterable[RolloutResult]) -> pa.Table:
    """One row per LLM call of every rollout, in call order."""
    rows = []
    for r in results:
        for t in sorted(r.transitions, key=lambda t: t.call_index):
            rows.append(
                {
                    "rollout_id": r.rollout_id,
                    "task_id": r.task_id,
                    "group_id": r.group_id,
                    "attempt": r.attempt,
                    "agent": t.agent,
                    "call_index": t.call_index,
                    "prompt_ids": t.prompt_ids,
                    "response_ids": t.response_ids,
                    "response_logprobs": t.response_logprobs,
                    "policy_version": t.policy_version,
                    "finish_reason": t.finish_reason,
                    "latency_s": t.latency_s,
                    "endpoint": t.endpoint,
                    "model": t.model,
                    "started_at": t.started_at,
                    "response_text": t.response_text,
                    "call_reward": t.reward,
                    "reward": r.reward,
                    "reward_dims": list(r.reward_dims.items()),
                    "status": r.status,
                }
            )
    return pa.Table.from_pylist(rows, schema=TRANSITION_SCHEMA)


def rollouts_table(results: Iterable[RolloutResult]) -> pa.Table:
    rows = [
        {
            "rollout_id": r.rollout_id,
            "task_id": r.task_id,
            "group_id": r.group_id,
            "attempt": r.attempt,
            "status": r.status,
            "failure_kind": r.failure_kind,
            "error_type": r.error_type,
            "error_message": r.error_message,
            "traceback": r.traceback,
            "reward": r.reward,
            "reward_dims": list(r.reward_dims.items()),
            "num_calls": len(r.transitions),
            "duration_s": r.duration_s,
            "worker": r.worker,
            "logs": r.logs,
        }
        for r in results
    ]
    return pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)


def put_group(results: Sequence[RolloutResult]) -> tuple[ray.ObjectRef, ray.ObjectRef]:
    """Put one finished group's two tables in the object store; returns (transitions_ref, rollouts_ref)."""
    return ray.put(transitions_table(results)), ray.put(rollouts_table(results))


def concat_refs(refs: Sequence[ray.ObjectRef], schema: pa.Schema) -> pa.Table:
    """Concatenate tables behind object refs (zero-copy reads from the object store)."""
    tables = ray.get(list(refs))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def write_parquet(table: pa.Table, run_dir: str | Path, name: str) -> Path:
    """Persist a table under run_dir/trajectories/NAME.parquet (atomic rename, so a crash leaves no half file)."""
    out = Path(run_dir) / "trajectories" / f"{name}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.rename(out)
    return out
