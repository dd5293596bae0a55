"""The multi-agent example (solver + checker, OpenAI Agents SDK) through real rollout workers on the tiny model:
roles come from the route, `rollout.train_agents` selects whose calls train, and each trained call carries its
rollout's reward. With `rollout.frozen_agents`, the rollout stack serves the checker from a frozen snapshot."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest
import ray
import torch
from ray import serve
from safetensors.torch import load_file

from lightning_ray.algorithms.advantages import rollout_rewards
from lightning_ray.data.merge import merge_prefix_turns, select_trained_calls
from lightning_ray.gateway.render import decode
from lightning_ray.inference.server import APP_NAME, FROZEN_APP_NAME, deploy_inference
from lightning_ray.models import builtin_tokenizer_dir
from lightning_ray.rollouts.collect import collect_batch
from lightning_ray.rollouts.stack import start_rollout_stack, stop_rollout_stack
from lightning_ray.weights.object_store import push_state
from tests.batches import run_batch


def multi_agent_config(tiny_config):
    cfg = tiny_config.model_copy(deep=True)
    cfg.data.train, cfg.data.val, cfg.data.shuffle = "examples/calc/data/val.jsonl", None, False
    cfg.rollout.agent = "examples.multi_agent.agent:solve_and_check"
    cfg.rollout.train_agents = ["solver"]
    cfg.rollout.num_workers, cfg.rollout.concurrency = 1, 4
    cfg.rollout.timeout_s, cfg.rollout.lease_timeout_s = 60.0, 120.0
    cfg.algorithm.group_size = 2
    return cfg


def test_solver_and_checker_roles_and_trained_selection(inference, tiny_config):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(builtin_tokenizer_dir()))
    cfg = multi_agent_config(tiny_config)
    batch = run_batch(cfg, "multi-agent", 2)

    rollouts = batch.rollouts.to_pylist()
    assert len(rollouts) == 4 and all(r["status"] == "succeeded" for r in rollouts), rollouts
    table = batch.transitions
    for r in rollouts:
        calls = table.filter(pc.equal(table["rollout_id"], r["rollout_id"])).sort_by("call_index").to_pylist()
        roles = [c["agent"] for c in calls]
        assert roles[0] == "solver" and roles[-1] == "checker", (
            roles
        )  # the solver runs first, then the checker
        assert roles == sorted(roles, key=lambda a: a != "solver")
        assert [c["call_index"] for c in calls] == list(range(len(calls)))
        for c in calls:
            assert c["response_text"] == decode(tok, c["response_ids"])
        checker_prompt = decode(tok, calls[-1]["prompt_ids"], skip_special_tokens=False)
        assert "You check a solution" in checker_prompt and '"name": "calculator"' not in checker_prompt

    trained = select_trained_calls(table, cfg.rollout.train_agents)
    assert set(trained["agent"].to_pylist()) == {"solver"}
    assert trained.num_rows == sum(1 for a in table["agent"].to_pylist() if a == "solver")
    # Credit: each trained call gets its rollout's reward, the same value the rollout reported.
    reported = {r["rollout_id"]: r["reward"] for r in rollouts}
    assert all(row["reward"] == reported[row["rollout_id"]] for row in trained.to_pylist())
    expected = [reported[rid] for rid in trained["rollout_id"].to_pylist()]
    assert rollout_rewards(trained)["credited"].tolist() == expected
    # Merging never joins calls of different roles.
    merged = merge_prefix_turns(table)
    assert merged.num_rows >= 2 * len(rollouts) and set(merged["agent"].to_pylist()) == {"solver", "checker"}


@pytest.fixture
def own_rollout_stack(inference, tiny_model_dir, tiny_config):
    """`start/stop_rollout_stack` redeploy and delete the live app too: put the session's tiny one back after
    (and never leave a frozen app behind, even if the test failed before stopping the stack)."""
    yield
    serve.delete(FROZEN_APP_NAME)
    deploy_inference(tiny_model_dir, tiny_config.model, tiny_config.inference)


@pytest.mark.slow  # CI time: covered by a faster test of the same part
def test_frozen_checker_through_the_rollout_stack(own_rollout_stack, tiny_config, tiny_model_dir):
    """As the train loop runs it: the stack deploys the frozen app, a broadcast moves only the live policy on,
    the checker's calls stay at policy version 0, and stopping the stack deletes both apps."""
    cfg = multi_agent_config(tiny_config)
    cfg.rollout.frozen_agents = ["checker"]
    inference, pool, workers = start_rollout_stack(cfg)
    try:
        assert {APP_NAME, FROZEN_APP_NAME} <= set(serve.status().applications)
        original = load_file(str(tiny_model_dir / "model.safetensors"))
        push_state(inference, ray.put({k: v + 0.1 * torch.randn_like(v) for k, v in original.items()}), 1)
        batch = collect_batch(pool, workers, 2, progress=False)
    finally:
        stop_rollout_stack(cfg, workers, [pool])
    assert not {APP_NAME, FROZEN_APP_NAME} & set(serve.status().applications)

    rollouts = batch.rollouts.to_pylist()
    assert len(rollouts) == 4 and all(r["status"] == "succeeded" for r in rollouts), rollouts
    calls = batch.transitions.to_pylist()
    versions = {(c["agent"], c["policy_version"]) for c in calls}
    assert versions == {("solver", 1), ("checker", 0)}, versions
    trained = select_trained_calls(batch.transitions, cfg.rollout.train_agents)
    assert set(trained["agent"].to_pylist()) == {"solver"}
