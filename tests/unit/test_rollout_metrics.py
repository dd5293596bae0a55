"""The step's `rollout/*` metrics count every rollout the step used up, the groups dropped before training too."""

from __future__ import annotations

from lightning_ray.data.schema import ROLLOUT_SCHEMA
from lightning_ray.monitor.step_metrics import rollout_metrics
from lightning_ray.monitor.summary import summarize_batch
from lightning_ray.rollouts.collect import Batch
from tests.unit.test_merge import row, table


def test_calls_and_tokens_count_dropped_groups_and_trained_calls_apart():
    trained = table([row("a", 0, [1, 2], [3, 4, 5]), row("a", 1, [1, 2, 3, 4, 5, 6], [7], version=4)])
    dropped = table([row("b", 0, [1, 2], [3, 4]), row("c", 0, [1, 2], [9])])  # a zero-variance group
    records = [{"rollout_id": r, "status": "succeeded", "reward": 0.5} for r in "abc"]
    batch = Batch(
        trained, ROLLOUT_SCHEMA.empty_table(), records, summarize_batch(records), 1.0, dropped=dropped
    )

    m = rollout_metrics(batch)

    assert m["rollout/rollouts"] == 3
    assert (m["rollout/llm_calls"], m["rollout/llm_calls_trained"], m["rollout/tokens"]) == (4, 2, 7)
    assert m["rollout/policy_version"] == 3  # the oldest version among the calls that train
    assert batch.calls_used().num_rows == 4


def test_a_batch_without_drops_counts_its_own_calls():
    calls = table([row("a", 0, [1], [2, 3])])
    records = [{"rollout_id": "a", "status": "succeeded", "reward": 1.0}]
    m = rollout_metrics(Batch(calls, ROLLOUT_SCHEMA.empty_table(), records, summarize_batch(records), 1.0))
    assert (m["rollout/llm_calls"], m["rollout/llm_calls_trained"], m["rollout/tokens"]) == (1, 1, 2)
