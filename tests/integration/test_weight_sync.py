"""`inference.weight_sync: collective` over gloo: a real learner broadcasts to every worker of two real vLLM replicas.

After a learner step and a sync, vLLM's log-probs equal the learner's (fp32, the tolerance of
test_learner_vllm), both replicas hold bit-identical weights (the same checksum as an object-store sync of the
same state), the policy version went up, and the group is reused by the next sync and rebuilt when a replica
left it (as a restarted replica would have).
"""

from __future__ import annotations

import numpy as np
import pytest
from ray import serve
from test_learner_vllm import VLLM_TOL, max_abs_diff, sample_table

from lightning_ray.algorithms.advantages import compute_advantages
from lightning_ray.config import AlgorithmConfig, Config, LearnerConfig
from lightning_ray.inference.server import deploy_inference
from lightning_ray.learner.group import LearnerGroup
from lightning_ray.weight_sync import close_weight_sync, object_store_sync, sync_weights

APP = "lightning-ray-weight-sync-test"
REPLICAS = 2


@pytest.fixture(scope="module")
def collective_config(tiny_config) -> Config:
    cfg = tiny_config.model_copy(deep=True)
    cfg.inference.weight_sync = "collective"
    cfg.inference.num_replicas = REPLICAS
    cfg.inference.num_cpus_per_replica = 0.25
    cfg.inference.weight_sync_timeout_s = 60.0
    return cfg


@pytest.fixture(scope="module")
def replicas(ray_cluster, collective_config, tiny_model_dir):
    """Two vLLM replicas of their own (the shared fixture has one): the group has ranks 0, 1 and 2."""
    handle = deploy_inference(tiny_model_dir, collective_config.model, collective_config.inference, APP)
    yield handle
    serve.delete(APP)


def checksums(handle) -> set[str]:
    return set(handle.broadcast("weights_checksum").results())


def train_one_step(group: LearnerGroup, handle, prompts: list[list[int]], seed: int) -> None:
    """One learner step on fresh vLLM samples that measurably moves the policy away from the engine's."""
    table = sample_table(handle, prompts, seed=seed)
    batch, _ = compute_advantages(table, AlgorithmConfig())
    group.train_step(batch, AlgorithmConfig())
    assert max_abs_diff(table, group.compute_logprobs(table)) > 10 * VLLM_TOL


def assert_serves_learner_weights(
    group: LearnerGroup, handle, prompts: list[list[int]], version: int
) -> None:
    fresh = sample_table(handle, prompts, seed=100 + version)
    assert set(fresh.column("policy_version").to_pylist()) == {version}
    diff = max_abs_diff(fresh, group.compute_logprobs(fresh))
    assert diff < VLLM_TOL, f"vLLM serves other weights than the learner's after the sync: {diff:.2e}"


def test_collective_sync_over_gloo(replicas, collective_config, tiny_model_dir):
    cfg = collective_config
    rng = np.random.default_rng(3)
    prompts = [rng.integers(100, 5000, int(rng.integers(3, 10))).tolist() for _ in range(6)]
    learner_cfg = LearnerConfig(
        num_workers=1, num_cpus_per_worker=0.5, zero_stage=0, micro_batch_size=3, lr=2e-2
    )
    group = LearnerGroup(learner_cfg, tiny_model_dir)
    version = replicas.policy_version.remote().result()
    try:
        train_one_step(group, replicas, prompts, seed=0)
        first = sync_weights(group, replicas, version + 1, cfg)
        assert [r["path"] for r in first] == ["collective"] * REPLICAS
        assert {r["policy_version"] for r in first} == {version + 1}
        group_id = group.weight_group_spec()["group_id"]
        assert group.weight_group_spec()["world_size"] == 1 + REPLICAS
        assert_serves_learner_weights(group, replicas, prompts, version + 1)
        # Bit-identical on both replicas, and to the object-store path with the same learner state.
        through_group = checksums(replicas)
        assert len(through_group) == 1
        object_store_sync(group, replicas, version + 2)
        assert checksums(replicas) == through_group

        train_one_step(group, replicas, prompts, seed=10)
        second = sync_weights(group, replicas, version + 3, cfg)
        assert [r["path"] for r in second] == ["collective"] * REPLICAS
        assert group.weight_group_spec()["group_id"] == group_id  # reused, not rebuilt
        assert_serves_learner_weights(group, replicas, prompts, version + 3)

        # A replica outside the group (a restarted one has none): the next sync rebuilds it first.
        replicas.broadcast("close_weight_group").results()
        train_one_step(group, replicas, prompts, seed=20)
        third = sync_weights(group, replicas, version + 4, cfg)
        assert [r["path"] for r in third] == ["collective"] * REPLICAS
        assert group.weight_group_spec()["group_id"] != group_id
        assert_serves_learner_weights(group, replicas, prompts, version + 4)
    finally:
        close_weight_sync(group, replicas)
        group.shutdown()
