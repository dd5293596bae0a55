"""The trajectory tables, the contract between gateway, workers, the driver and learners: their schemas, how
they are built from finished rollouts, and how they are read back.

The gateway records a `Transition` per LLM call; a rollout worker wraps each rollout's transitions with its
identity and rewards in a `FinishedRollout` and builds two tables per finished group (`group_tables`):

- `transitions`: one row per LLM call (`TRANSITION_SCHEMA`), what the learner trains on;
- `rollouts`: one row per rollout, failed ones included, with the error, logs and final state (`ROLLOUT_SCHEMA`).

Tables move as object refs; the driver concatenates them with `concat_refs`, never through Python rows, and
`write_parquet` keeps a copy in the run directory. Token ids, log-probs and policy versions are Arrow list
columns, read as flat numpy values with `list_column`; `response_versions` holds the version of each response
token (a call that spans a weight update under `inference.on_update: interrupt` has two). `MERGED_SCHEMA` is
the transitions layout after `merge_prefix_turns` (`lightning_ray.data.merge` says what its two extra columns
mean).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from lightning_ray.run_files import replace_file


@dataclass
class Transition:
    """One LLM call exactly as the engine saw and produced it."""

    call_index: int
    agent: str
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    response_versions: list[int]  # the policy version that generated each response token
    policy_version: int  # the version the call started on (the oldest of `response_versions`)
    finish_reason: str
    latency_s: float
    response_text: str
    endpoint: str = "chat"
    model: str = ""
    started_at: float = 0.0
    reward: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FinishedRollout:
    """Everything one attempt of a rollout produced, as the worker that ran it hands it on."""

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


# Whose row it is: the first columns of both tables.
_IDENTITY = [
    pa.field("rollout_id", pa.string(), nullable=False),
    pa.field("task_id", pa.string(), nullable=False),
    pa.field("group_id", pa.string(), nullable=False),
    pa.field("attempt", pa.int32(), nullable=False),
]

TRANSITION_SCHEMA = pa.schema(
    [
        *_IDENTITY,
        pa.field("agent", pa.string(), nullable=False),
        pa.field("call_index", pa.int32(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("response_versions", pa.list_(pa.int64()), nullable=False),
        pa.field("policy_version", pa.int64(), nullable=False),
        pa.field("finish_reason", pa.string()),
        pa.field("latency_s", pa.float64()),
        pa.field("endpoint", pa.string()),
        pa.field("model", pa.string()),
        pa.field("started_at", pa.float64()),
        pa.field("response_text", pa.string()),
        pa.field("call_reward", pa.float64(), nullable=True),
        pa.field("reward", pa.float64(), nullable=True),
        pa.field("reward_dims", pa.map_(pa.string(), pa.float64())),
        pa.field("status", pa.string(), nullable=False),
    ]
)

ROLLOUT_SCHEMA = pa.schema(
    [
        *_IDENTITY,
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

MERGED_SCHEMA = TRANSITION_SCHEMA.append(pa.field("loss_mask", pa.list_(pa.int8()), nullable=False)).append(
    pa.field("merged_calls", pa.int32(), nullable=False)
)

# The tables of one finished group, by the name they travel under (`group_tables`, `TaskPoolActor.report_group`).
GROUP_TABLES = {"transitions": TRANSITION_SCHEMA, "rollouts": ROLLOUT_SCHEMA}

# ---- building ------------------------------------------------------------------------------------------------


def _identity(r: FinishedRollout) -> dict[str, str | int]:
    return {f.name: getattr(r, f.name) for f in _IDENTITY}


def transitions_table(rollouts: Iterable[FinishedRollout]) -> pa.Table:
    """One row per LLM call of every rollout, in call order."""
    rows = []
    for r in rollouts:
        for t in sorted(r.transitions, key=lambda t: t.call_index):
            rows.append(
                {
                    **_identity(r),
                    "agent": t.agent,
                    "call_index": t.call_index,
                    "prompt_ids": t.prompt_ids,
                    "response_ids": t.response_ids,
                    "response_logprobs": t.response_logprobs,
                    "response_versions": t.response_versions,
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


def rollouts_table(rollouts: Iterable[FinishedRollout]) -> pa.Table:
    """One row per rollout, with or without calls."""
    rows = [
        {
            **_identity(r),
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
        for r in rollouts
    ]
    return pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)


def group_tables(rollouts: Sequence[FinishedRollout]) -> dict[str, pa.Table]:
    """The `GROUP_TABLES` of one finished group."""
    return {"transitions": transitions_table(rollouts), "rollouts": rollouts_table(rollouts)}


# ---- reading and writing -------------------------------------------------------------------------------------


def concat_refs(refs: Sequence[ray.ObjectRef], schema: pa.Schema) -> pa.Table:
    """Concatenate tables behind object refs (zero-copy reads from the object store)."""
    tables = ray.get(list(refs))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, per-row lengths) of a list column, without Python lists: row i is
    `values[offsets[i]:offsets[i + 1]]` with `offsets = [0, *cumsum(lengths)]`."""
    column = table.column(name)
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros(0, dtype=arr.type.value_type.to_pandas_dtype()), np.zeros(0, dtype=np.int64)
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values, lengths


def write_parquet(table: pa.Table, run_dir: str | Path, name: str) -> Path:
    """Persist a table under run_dir/trajectories/NAME.parquet (atomic rename, so a crash leaves no half file;
    a full disk is `RunFileWriteError`)."""
    out = Path(run_dir) / "trajectories" / f"{name}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    return replace_file(out, lambda tmp: pq.write_table(table, tmp), f"writing {table.num_rows} rows")
