"""Training-table shaping: prefix-extending turns merged, rewritten histories left alone, trained roles."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from lightning_ray.algorithms.losses import loss_denominator, policy_loss
from lightning_ray.config import AlgorithmConfig
from lightning_ray.data.merge import MERGED_SCHEMA, merge_prefix_turns, select_trained_calls
from lightning_ray.data.schema import TRANSITION_SCHEMA
from lightning_ray.learner.batch import table_to_batch
from lightning_ray.learner.forward import forward_logprobs
from tests.unit.test_packing import tiny_llama


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
        "response_versions": kw.get("versions", [kw.get("version", 3)] * len(response)),
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


def test_merged_versions_stay_aligned_inserted_tokens_take_the_next_calls_version():
    # call 1 spans a weight update (tokens of versions 4 and 5); call 2 starts on 5, call 3 on 6.
    calls = [
        row("a", 0, [1, 2], [10, 11], version=3),
        row("a", 1, [1, 2, 10, 11, 7, 7], [12, 13, 14], version=4, versions=[4, 5, 5]),
        row("a", 2, [1, 2, 10, 11, 7, 7, 12, 13, 14, 8], [15], version=5),
        row("a", 3, [1, 2, 10, 11, 7, 7, 12, 13, 14, 8, 15], [16], version=6),  # nothing inserted before it
    ]
    [r] = merge_prefix_turns(table(calls)).to_pylist()
    assert r["response_ids"] == [10, 11, 7, 7, 12, 13, 14, 8, 15, 16]
    assert r["loss_mask"] == [1, 1, 0, 0, 1, 1, 1, 0, 1, 1]
    assert r["response_versions"] == [3, 3, 4, 4, 4, 5, 5, 5, 5, 6]
    assert len(r["response_versions"]) == len(r["response_ids"]) == len(r["response_logprobs"])
    assert r["policy_version"] == 3  # the oldest call


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
        assert merged["response_versions"] == original["response_versions"]


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


def token_loss_and_grads(model: torch.nn.Module, rows: pa.Table) -> tuple[float, list[torch.Tensor]]:
    """The learner's PPO token loss (advantage 1, old = current log-probs) and its gradients on `rows`."""
    model.zero_grad()
    batch = table_to_batch(rows.append_column("advantage", pa.array([1.0] * rows.num_rows, pa.float32())))
    logp, _ = forward_logprobs(model, batch)
    mask = batch["response_mask"]
    loss, _ = policy_loss(
        AlgorithmConfig(),
        logp,
        logp.detach(),
        batch["advantages"],
        mask,
        denominator=float(loss_denominator(mask, "token")),
    )
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


def test_learner_trains_a_merged_row_exactly_like_its_separate_calls():
    """With `loss_mask`, the tokens the agent inserted (tool results) carry no loss, and the generated tokens
    see the same context as in their own calls: loss and gradients equal those of the unmerged calls."""
    calls = table(
        [
            row("a", 0, [1, 2], [10, 11]),
            row("a", 1, [1, 2, 10, 11, 7, 7], [12]),
            row("a", 2, [1, 2, 10, 11, 7, 7, 12, 8], [13, 14]),
        ]
    )
    merged = merge_prefix_turns(calls)
    batch = table_to_batch(merged)
    assert batch["response_mask"].tolist() == [[1, 1, 0, 0, 1, 0, 1, 1]]
    model = tiny_llama()
    merged_loss, merged_grads = token_loss_and_grads(model, merged)
    separate_loss, separate_grads = token_loss_and_grads(model, calls)
    assert math.isclose(merged_loss, separate_loss, rel_tol=1e-5, abs_tol=1e-7)
    for a, b in zip(merged_grads, separate_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_table_to_batch_rejects_a_loss_mask_of_the_wrong_length():
    merged = merge_prefix_turns(table([row("a", 0, [1, 2], [10, 11])]))
    bad = merged.set_column(
        merged.schema.get_field_index("loss_mask"),
        "loss_mask",
        pa.array([[1]], pa.list_(pa.int8())),
    )
    with pytest.raises(ValueError, match="row 0: 1 loss_mask entries for 2 response tokens"):
        table_to_batch(bad)
