"""The learner and the vLLM engine agree on log-probs for the same weights, before and after a weight broadcast.

Both run the tiny model in fp32. vLLM reports the log-prob of each sampled token under the raw (temperature 1)
distribution; the learner recomputes it from the prompt and response ids. Stated tolerance: 1e-3 absolute per
token (measured: 2e-6 on this machine; different kernels, same maths).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import ray
from safetensors.torch import load_file

from lightning_ray.algorithms.advantages import compute_advantages
from lightning_ray.config import AlgorithmConfig, LearnerConfig
from lightning_ray.data.schema import TRANSITION_SCHEMA
from lightning_ray.learner.group import LearnerGroup
from lightning_ray.weights.object_store import push_state

VLLM_TOL = 1e-3
SAMPLING = {"temperature": 1.0, "max_tokens": 12}


def sample_table(inference, prompts: list[list[int]], seed: int) -> pa.Table:
    """One vLLM sample per prompt, as trajectory rows; two samples per group with rewards 1 and 0."""
    outs = [
        inference.generate.remote(p, {**SAMPLING, "seed": seed + i}).result() for i, p in enumerate(prompts)
    ]
    n = len(outs)
    return pa.Table.from_pydict(
        {
            "rollout_id": [f"r{i}" for i in range(n)],
            "task_id": [f"t{i // 2}" for i in range(n)],
            "group_id": [f"g{i // 2}" for i in range(n)],
            "attempt": [0] * n,
            "agent": ["agent"] * n,
            "call_index": [0] * n,
            "prompt_ids": [o["prompt_ids"] for o in outs],
            "response_ids": [o["response_ids"] for o in outs],
            "response_logprobs": [o["response_logprobs"] for o in outs],
            "response_versions": [o["response_versions"] for o in outs],
            "policy_version": [o["policy_version"] for o in outs],
            "finish_reason": [o["finish_reason"] for o in outs],
            "latency_s": [0.0] * n,
            "endpoint": ["completions"] * n,
            "model": ["tiny"] * n,
            "started_at": [0.0] * n,
            "response_text": [""] * n,
            "call_reward": [None] * n,
            "reward": [float(i % 2) for i in range(n)],
            "reward_dims": [[]] * n,
            "status": ["ok"] * n,
        },
        schema=TRANSITION_SCHEMA,
    )


def max_abs_diff(table: pa.Table, learner: list[np.ndarray]) -> float:
    engine = table.column("response_logprobs").to_numpy(zero_copy_only=False)
    return max(
        float(np.abs(np.asarray(e, np.float32) - lp).max()) for e, lp in zip(engine, learner, strict=True)
    )


def test_learner_logprobs_match_vllm_before_and_after_broadcast(inference, ray_cluster, tiny_model_dir):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 5000, int(rng.integers(3, 10))).tolist() for _ in range(6)]
    cfg = LearnerConfig(num_workers=1, num_cpus_per_worker=0.5, zero_stage=0, micro_batch_size=3, lr=2e-2)
    group = LearnerGroup(cfg, tiny_model_dir)
    version = inference.policy_version.remote().result()
    try:
        table = sample_table(inference, prompts, seed=0)
        before = group.compute_logprobs(table)
        assert max_abs_diff(table, before) < VLLM_TOL

        batch, _ = compute_advantages(table, AlgorithmConfig())
        group.train_step(batch, AlgorithmConfig())
        moved = group.compute_logprobs(table)
        assert max_abs_diff(table, moved) > 10 * VLLM_TOL  # the step changed the policy measurably

        [result] = push_state(inference, group.state_dict_ref(), version + 1)
        assert result["policy_version"] == version + 1
        fresh = sample_table(inference, prompts, seed=100)
        assert set(fresh.column("policy_version").to_pylist()) == {version + 1}
        # A stale tied lm_head in the engine (its CPU GEMM packs a copy of the embedding at load time) shows
        # up here as a ~2e-3 gap while every other weight matches.
        diff = max_abs_diff(fresh, group.compute_logprobs(fresh))
        assert diff < VLLM_TOL, (
            f"vLLM serves other weights than the learner's after the broadcast: {diff:.2e}"
        )
    finally:
        original = load_file(str(tiny_model_dir / "model.safetensors"))
        push_state(inference, ray.put(original), version + 2)
        group.shutdown()


def test_rollout_logprobs_as_old_policy(inference, ray_cluster, tiny_model_dir):
    """old_logprobs=rollout uses the engine's log-probs: with the same weights the first ratio is ~1."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(100, 5000, 6).tolist() for _ in range(4)]
    table, _ = compute_advantages(sample_table(inference, prompts, seed=7), AlgorithmConfig())
    group = LearnerGroup(
        LearnerConfig(num_workers=1, num_cpus_per_worker=0.5, micro_batch_size=4), tiny_model_dir
    )
    try:
        m = group.train_step(table, AlgorithmConfig(old_logprobs="rollout"))
    finally:
        group.shutdown()
    assert m["ratio"] == pytest.approx(1.0, abs=VLLM_TOL) and m["tis_frac"] == 0.0
