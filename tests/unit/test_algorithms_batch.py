"""Arrow -> tensors for the learner: padding layout, micro-batches and group shards, checked element by element."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from lightning_ray.algorithms.advantages import compute_advantages
from lightning_ray.config import AlgorithmConfig
from lightning_ray.data.schema import TRANSITION_SCHEMA
from lightning_ray.learner.batch import (
    list_column,
    padding_batch,
    shard_by_group,
    split_micro_batches,
    table_to_batch,
)


def make_table(rows: list[tuple]) -> pa.Table:
    """rows: (group_id, rollout_id, prompt_ids, response_ids, reward)."""
    n = len(rows)
    return pa.Table.from_pydict(
        {
            "rollout_id": [r[1] for r in rows],
            "task_id": [r[0] for r in rows],
            "group_id": [r[0] for r in rows],
            "attempt": [0] * n,
            "agent": ["agent"] * n,
            "call_index": [0] * n,
            "prompt_ids": [r[2] for r in rows],
            "response_ids": [r[3] for r in rows],
            "response_logprobs": [[-0.5 * (j + 1) for j in range(len(r[3]))] for r in rows],
            "response_versions": [[0] * len(r[3]) for r in rows],
            "policy_version": [0] * n,
            "finish_reason": ["stop"] * n,
            "latency_s": [0.0] * n,
            "endpoint": ["chat"] * n,
            "model": ["m"] * n,
            "started_at": [0.0] * n,
            "response_text": [""] * n,
            "call_reward": [None] * n,
            "reward": [r[4] for r in rows],
            "reward_dims": [[]] * n,
            "status": ["ok"] * n,
        },
        schema=TRANSITION_SCHEMA,
    )


def test_left_padded_layout():
    table = make_table(
        [
            ("g", "a", [11, 12], [21, 22, 23], 1.0),
            ("g", "b", [13, 14, 15, 16], [24], 0.0),
        ]
    )
    table, _ = compute_advantages(table, AlgorithmConfig(norm_std=False))
    b = table_to_batch(table, pad_id=0)
    # T = max(2 + 3, 4 + 1) = 5, R = 3; each row ends at the last column
    assert b["input_ids"].tolist() == [[11, 12, 21, 22, 23], [13, 14, 15, 16, 24]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert b["targets"].tolist() == [[21, 22, 23], [0, 0, 24]]
    assert b["response_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b["rollout_logprobs"].tolist() == [[-0.5, -1.0, -1.5], [0.0, 0.0, -0.5]]
    # rewards [1, 0] without std: +-0.5
    assert b["advantages"].tolist() == [0.5, -0.5]
    assert b["response_lengths"].tolist() == [3, 1]
    assert b["input_ids"].dtype == torch.int64 and b["response_mask"].dtype == torch.float32


def test_padding_and_positions():
    table = make_table([("g", "a", [11], [21], 1.0), ("g", "b", [12, 13, 14], [22, 23], 0.0)])
    b = table_to_batch(table, pad_id=7)
    # T = 5: row a is [pad, pad, pad, 11, 21]; positions restart at 0 on the first real token
    assert b["input_ids"].tolist() == [[7, 7, 7, 11, 21], [12, 13, 14, 22, 23]]
    assert b["attention_mask"].tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 0, 0, 0, 1], [0, 1, 2, 3, 4]]
    assert b["targets"].tolist() == [[7, 21], [22, 23]]
    assert b["response_mask"].tolist() == [[0, 1], [1, 1]]
    assert b["advantages"].tolist() == [0.0, 0.0]  # no advantage column yet


def test_room_for_the_first_prediction_and_empty_response():
    # one prompt token, three response tokens: T must be >= R + 1 = 4 so logits_to_keep covers the first one
    table = make_table([("g", "a", [11], [21, 22, 23], 1.0), ("g", "b", [12], [], 0.0)])
    b = table_to_batch(table)
    assert b["input_ids"].shape == (2, 4)
    assert b["targets"].tolist() == [[21, 22, 23], [0, 0, 0]]
    assert b["response_mask"].tolist() == [[1, 1, 1], [0, 0, 0]]


def test_rejects_bad_rows():
    with pytest.raises(ValueError, match="empty prompt"):
        table_to_batch(make_table([("g", "a", [], [21], 1.0)]))
    t = make_table([("g", "a", [1], [21, 22], 1.0)])
    t = t.set_column(
        t.column_names.index("response_logprobs"),
        "response_logprobs",
        pa.array([[-1.0]], pa.list_(pa.float32())),
    )
    with pytest.raises(ValueError, match="1 response log-probs for 2"):
        table_to_batch(t)


def test_sliced_and_chunked_columns():
    rows = [("g", f"r{i}", [1, 2, i + 3], [10 + i] * (i + 1), float(i)) for i in range(5)]
    t = make_table(rows)
    chunked = pa.concat_tables([t.slice(0, 2), t.slice(2, 3)])
    values, lengths = list_column(chunked.slice(1, 3), "response_ids")
    assert lengths.tolist() == [2, 3, 4]
    assert values.tolist() == [11, 11, 12, 12, 12, 13, 13, 13, 13]
    micro = split_micro_batches(chunked, 2)
    assert [m.num_rows for m in micro] == [2, 2, 1]
    parts = [table_to_batch(m) for m in micro]
    # each micro-batch pads only to its own longest row
    assert parts[1]["targets"].tolist() == [[0, 12, 12, 12], [13, 13, 13, 13]]
    assert parts[2]["targets"].tolist() == [[14, 14, 14, 14, 14]]


def test_padding_batch_is_inert():
    b = padding_batch(3)
    assert b["response_mask"].sum() == 0 and b["targets"].shape[1] + 1 <= b["input_ids"].shape[1]


def test_shard_by_group_keeps_groups_whole_and_balances():
    rows = []
    sizes = {"g0": 40, "g1": 30, "g2": 20, "g3": 10, "g4": 10}  # tokens per row (prompt + response)
    for g, size in sizes.items():
        for k in range(2):
            rows.append((g, f"{g}r{k}", [1] * (size - 2), [2, 2], 1.0))
    t = make_table(rows)
    shards = shard_by_group(t, 2)
    groups = [set(np.asarray(t.column("group_id"))[idx]) for idx in shards]
    assert groups[0].isdisjoint(groups[1]) and groups[0] | groups[1] == set(sizes)
    # greedy by size: g0 -> s0 (80), g1 -> s1 (60), g2 -> s1 (100), g3 -> s0 (100), g4 -> s0 or s1 (+20)
    loads = [sum(2 * sizes[g] for g in gs) for gs in groups]
    assert sorted(loads) == [100, 120]
    assert all(np.all(np.diff(idx) > 0) for idx in shards)  # table order kept inside a shard
    assert [len(s) for s in shard_by_group(t.slice(0, 2), 3)] == [2, 0, 0]
