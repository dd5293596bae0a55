"""Training-table shaping: prefix-extending turns merged, rewritten histories left alone, trained roles."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from lightning_ray.data.merge import MERGED_SCHEMA, merge_prefix_turns, select_trained_calls
from lightning_ray.data.schema import TRANSITION_SCHEMA


def row(
    rollout: str, index: int, prompt: list[int], response: list[int], agent: str = "default", **kw
) -> dict:
    return {
        "rollout_id": rollout,
        "task_id": "t",
        "group_id": "g",
        "attempt": 0,
        "agent": agent,
        "call_index": index,
        "prompt_ids": prompt,
        "response_ids": response,
        "response_logprobs": [-0.1 * (j + 1) - index for j in range(len(response))],
        "policy_version": kw.get("version", 3),
        "finish_reason": kw.get("finish", "stop"),
        "latency_s": 1.0,
        "endpoint": "chat",
        "model": "m",
        "started_at": float(index),
        "response_text": f"r{index}",
        "call_reward": kw.get("call_reward"),
        "reward": kw.get("reward", 1.0),
        "reward_dims": [],
        "status": "succeeded",
    }


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=TRANSITION_SCHEMA)


def test_prefix_extending_calls_merge_into_one_sequence():
    # call 1's prompt = call 0's prompt + response + a tool result [7, 7]; call 2 extends call 1 the same way.
    calls = [
        row("a", 0, [1, 2], [10, 11], version=3),
        row("a", 1, [1, 2, 10, 11, 7, 7], [12], version=4, call_reward=0.5),
        row("a", 2, [1, 2, 10, 11, 7, 7, 12, 8], [13, 14], finish="length"),
    ]
    out = merge_prefix_turns(table(list(reversed(calls))))  # any row order
    assert out.schema == MERGED_SCHEMA and out.num_rows == 1
    r = out.to_pylist()[0]
    assert r["prompt_ids"] == [1, 2]
    assert r["response_ids"] == [10, 11, 7, 7, 12, 8, 13, 14]
    assert r["loss_mask"] == [1, 1, 0, 0, 1, 0, 1, 1]
    generated = [lp for lp, m in zip(r["response_logprobs"], r["loss_mask"], strict=True) if m]
    expected = [lp for c in calls for lp in c["response_logprobs"]]
    assert np.allclose(generated, expected)
    assert all(lp == 0.0 for lp, m in zip(r["response_logprobs"], r["loss_mask"], strict=True) if not m)
    assert (r["merged_calls"], r["call_index"], r["finish_reason"], r["policy_version"]) == (
        3,
        0,
        "length",
        3,
    )
    assert math.isclose(r["latency_s"], 3.0) and r["call_reward"] == 0.5 and r["reward"] == 1.0
    assert r["response_text"] == "r0\nr1\nr2"


def test_rewritten_history_is_not_merged():
    # call 1 summarised the history: its prompt does not start with call 0's prompt + response.
    calls = [row("a", 0, [1, 2, 3], [10, 11]), row("a", 1, [1, 9, 10, 11], [12])]
    out = merge_prefix_turns(table(calls))
    assert out.num_rows == 2
    for merged, original in zip(out.to_pylist(), calls, strict=True):
        assert merged["prompt_ids"] == original["prompt_ids"]
        assert merged["response_ids"] == original["response_ids"]
        assert np.allclose(merged["response_logprobs"], original["response_logprobs"])
        assert merged["loss_mask"] == [1] * len(original["response_ids"]) and merged["merged_calls"] == 1


def test_merge_stops_at_rollout_and_agent_boundaries_and_breaks_in_chains():
    calls = [
        row("a", 0, [1], [2]),
        row("a", 1, [1, 2, 3], [4]),  # extends call 0
        row("a", 2, [5], [6]),  # new context: a second chain starts
        row("a", 3, [5, 6, 0], [7], agent="checker"),  # extends call 2 but another agent
        row("b", 0, [1, 2, 3, 4, 9], [8]),  # another rollout
    ]
    out = merge_prefix_turns(table(calls)).to_pylist()
    assert [(r["rollout_id"], r["call_index"], r["merged_calls"]) for r in out] == [
        ("a", 0, 2),
        ("a", 2, 1),
        ("a", 3, 1),
        ("b", 0, 1),
    ]
    assert out[0]["response_ids"] == [2, 3, 4] and out[0]["loss_mask"] == [1, 0, 1]


def test_empty_table_merges_to_empty():
    out = merge_prefix_turns(table([]))
    assert out.num_rows == 0 and out.schema == MERGED_SCHEMA


def test_select_trained_calls_keeps_roles_and_their_rollout_reward():
    calls = [
        row("a", 0, [1], [2], agent="solver", reward=1.0),
        row("a", 1, [3], [4], agent="checker", reward=1.0),
        row("b", 0, [1], [2], agent="solver", reward=0.0),
    ]
    t = table(calls)
    assert select_trained_calls(t, None) is t
    solver = select_trained_calls(t, ["solver"]).to_pylist()
    assert [(r["rollout_id"], r["agent"], r["reward"]) for r in solver] == [
        ("a", "solver", 1.0),
        ("b", "solver", 0.0),
    ]
    assert select_trained_calls(t, ["solver", "checker"]).num_rows == 3
    assert select_trained_calls(t, ["nobody"]).num_rows == 0
    with pytest.raises(ValueError, match="empty"):
        select_trained_calls(t, [])
