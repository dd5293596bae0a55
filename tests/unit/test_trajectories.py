"""Trajectory tables: exactly what the gateway recorded survives Arrow, the object store and Parquet."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from lightning_ray.data.schema import TRANSITION_SCHEMA, Transition
from lightning_ray.data.trajectories import (
    ROLLOUT_SCHEMA,
    RolloutResult,
    concat_refs,
    put_group,
    rollouts_table,
    transitions_table,
    write_parquet,
)


def transition(i: int, n: int) -> Transition:
    return Transition(
        call_index=i,
        agent="solver",
        prompt_ids=list(range(1, 5 + i)),
        response_ids=list(range(100, 100 + n)),
        response_logprobs=[-0.5 * (k + 1) for k in range(n)],
        policy_version=3,
        finish_reason="stop",
        latency_s=0.01,
        response_text="x" * n,
        reward=0.25 if i == 0 else None,
    )


def results() -> list[RolloutResult]:
    ok = RolloutResult(
        "r1", "t1", "g1", 1, "succeeded", [transition(1, 2), transition(0, 3)], 1.0, {"format": 1.0}
    )
    failed = RolloutResult(
        "r2",
        "t1",
        "g1",
        2,
        "failed",
        [],
        None,
        failure_kind="agent_exception",
        error_type="ValueError",
        error_message="boom",
        traceback="Traceback ...",
        logs="stdout line\n",
    )
    return [ok, failed]


def test_one_row_per_call_in_call_order():
    table = transitions_table(results())
    assert table.schema == TRANSITION_SCHEMA
    assert table.num_rows == 2
    assert table["call_index"].to_pylist() == [0, 1]
    assert table["response_ids"].to_pylist() == [[100, 101, 102], [100, 101]]
    assert table["call_reward"].to_pylist() == [0.25, None]
    assert table["reward"].to_pylist() == [1.0, 1.0]
    assert table["reward_dims"].to_pylist()[0] == [("format", 1.0)]
    logprobs = table["response_logprobs"].to_pylist()[0]
    assert logprobs == pytest.approx([-0.5, -1.0, -1.5])


def test_rollouts_table_keeps_failures_without_calls():
    table = rollouts_table(results())
    assert table.schema == ROLLOUT_SCHEMA
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["succeeded", "failed"]
    assert (
        rows[1]["num_calls"] == 0
        and rows[1]["error_type"] == "ValueError"
        and rows[1]["logs"] == "stdout line\n"
    )


def test_object_store_and_parquet_round_trip(ray_cluster, tmp_path):
    refs = [put_group(results()) for _ in range(3)]
    table = concat_refs([t for t, _ in refs], TRANSITION_SCHEMA)
    assert table.num_rows == 6
    path = write_parquet(table, tmp_path, "step-000001")
    assert pq.read_table(path).equals(table)
    assert concat_refs([], TRANSITION_SCHEMA).num_rows == 0
