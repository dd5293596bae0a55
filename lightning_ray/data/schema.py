"""The trajectory table: one Arrow row per LLM call, the contract between gateway, workers and learners.

The gateway records a `Transition` per call; a rollout worker adds the rollout's identity and rewards and
builds one table per finished group. Token ids and log-probs are Arrow list columns, so the learner turns
them into tensors with `flatten()` + offsets, never through Python lists.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pyarrow as pa


@dataclass
class Transition:
    """One LLM call exactly as the engine saw and produced it."""

    call_index: int
    agent: str
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    policy_version: int
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


TRANSITION_SCHEMA = pa.schema(
    [
        pa.field("rollout_id", pa.string(), nullable=False),
        pa.field("task_id", pa.string(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("attempt", pa.int32(), nullable=False),
        pa.field("agent", pa.string(), nullable=False),
        pa.field("call_index", pa.int32(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_logprobs", pa.list_(pa.float32()), nullable=False),
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
