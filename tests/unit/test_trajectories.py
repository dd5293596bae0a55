"""Trajectory tables: exactly what the gateway recorded survives Arrow, the object store and Parquet."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from lightning_ray.data.schema import (
    GROUP_TABLES,
    ROLLOUT_SCHEMA,
    TRANSITION_SCHEMA,
    FinishedRollout,
    Transition,
    concat_refs,
    group_tables,
    list_column,
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
        response_versions=[3] * n,
        policy_version=3,
        finish_reason="stop",
        latency_s=0.01,
        response_text="x" * n,
        reward=0.25 if i == 0 else None,
    )


def results() -> list[FinishedRollout]:
    ok = FinishedRollout(
        "r1", "t1", "g1", 1, "succeeded", [transition(1, 2), transition(0, 3)], 1.0, {"format": 1.0}
    )
    failed = FinishedRollout(
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
    assert table["response_versions"].to_pylist() == [[3, 3, 3], [3, 3]]


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


def test_group_tables_follow_their_schemas():
    tables = group_tables(results())
    assert {name: t.schema for name, t in tables.items()} == GROUP_TABLES


def test_list_column_reads_flat_values_and_lengths():
    table = pa.concat_tables([transitions_table(results()), transitions_table(results()[:1])])
    values, lengths = list_column(table, "response_ids")
    assert lengths.tolist() == [3, 2, 3, 2]
    assert values.tolist() == [100, 101, 102, 100, 101] * 2
    empty_values, empty_lengths = list_column(TRANSITION_SCHEMA.empty_table(), "response_logprobs")
    assert (len(empty_values), len(empty_lengths), empty_values.dtype) == (0, 0, np.float32)


def test_object_store_and_parquet_round_trip(ray_cluster, tmp_path):
    refs = [ray.put(transitions_table(results())) for _ in range(3)]
    table = concat_refs(refs, TRANSITION_SCHEMA)
    assert table.num_rows == 6
    path = write_parquet(table, tmp_path, "step-000001")
    assert pq.read_table(path).equals(table)
    assert concat_refs([], TRANSITION_SCHEMA).num_rows == 0
