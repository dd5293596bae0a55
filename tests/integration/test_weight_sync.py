"""`inference.weight_sync: collective` over gloo and `ipc` on CPU: a real learner updates every worker of two
real vLLM replicas.

After a learner step and a sync, vLLM's log-probs equal the learner's (fp32, the tolerance of
test_learner_vllm), both replicas hold bit-identical weights (the same checksum as an object-store sync of the
same state), and the policy version went up. The collective group is reused by the next sync and rebuilt when
a replica left it (as a restarted replica would have); the ipc hand-off leaves no shared-memory file behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ray import serve
from test_learner_vllm import VLLM_TOL, max_abs_diff, sample_table

from lightning_ray.algorithms.advantages import compute_advantages
from lightning_ray.config import AlgorithmConfig, Config, LearnerConfig
from lightning_ray.inference.server import InferenceServer, deploy_inference
from lightning_ray.learner.group import LearnerGroup
from lightning_ray.weights import close_weight_sync, object_store, sync_context, sync_weights

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
    return set(handle.broadcast(InferenceServer.weights_checksum.__name__).results())


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


def prompts_and_learner(tiny_model_dir, seed: int) -> tuple[list[list[int]], LearnerGroup]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(100, 5000, int(rng.integers(3, 10))).tolist() for _ in range(6)]
    learner_cfg = LearnerConfig(
        num_workers=1, num_cpus_per_worker=0.5, zero_stage=0, micro_batch_size=3, lr=2e-2
    )
    return prompts, LearnerGroup(learner_cfg, tiny_model_dir)


def assert_same_as_object_store(group: LearnerGroup, handle, version: int, cfg: Config) -> set[str]:
    """Both replicas hold bit-identical weights, the same as an object-store sync of the same learner state
    (synced as `version`); returns their checksums."""
    synced = checksums(handle)
    assert len(synced) == 1
    object_store.sync(sync_context(group, handle, cfg), version)
    assert checksums(handle) == synced
    return synced


def learner_group(group: LearnerGroup, replicas, cfg: Config) -> dict:
    """The weight group learner rank 0 is in (empty when none)."""
    return sync_context(group, replicas, cfg).learner_status("collective")


def test_collective_sync_over_gloo(replicas, collective_config, tiny_model_dir):
    cfg = collective_config
    prompts, group = prompts_and_learner(tiny_model_dir, seed=3)
    version = replicas.policy_version.remote().result()
    try:
        train_one_step(group, replicas, prompts, seed=0)
        first = sync_weights(group, replicas, version + 1, cfg)
        assert [r["path"] for r in first] == ["collective"] * REPLICAS
        assert {r["policy_version"] for r in first} == {version + 1}
        group_id = learner_group(group, replicas, cfg)["group_id"]
        assert learner_group(group, replicas, cfg)["world_size"] == 1 + REPLICAS
        assert_serves_learner_weights(group, replicas, prompts, version + 1)
        assert_same_as_object_store(group, replicas, version + 2, cfg)

        train_one_step(group, replicas, prompts, seed=10)
        second = sync_weights(group, replicas, version + 3, cfg)
        assert [r["path"] for r in second] == ["collective"] * REPLICAS
        assert learner_group(group, replicas, cfg)["group_id"] == group_id  # reused, not rebuilt
        assert_serves_learner_weights(group, replicas, prompts, version + 3)

        # A replica outside the group (a restarted one has none): the next sync rebuilds it first.
        replicas.broadcast(InferenceServer.close_weights.__name__).results()
        train_one_step(group, replicas, prompts, seed=20)
        third = sync_weights(group, replicas, version + 4, cfg)
        assert [r["path"] for r in third] == ["collective"] * REPLICAS
        assert learner_group(group, replicas, cfg)["group_id"] != group_id
        assert_serves_learner_weights(group, replicas, prompts, version + 4)
    finally:
        close_weight_sync(group, replicas, cfg)
        group.shutdown()


def shm_files() -> set[str]:
    """torch's shared-memory files (the ipc hand-off's host buffers live in them)."""
    return {p.name for p in Path("/dev/shm").glob("torch_*")}


def test_ipc_sync_on_cpu(replicas, collective_config, tiny_model_dir):
    cfg = collective_config.model_copy(deep=True)
    cfg.inference.weight_sync = "ipc"
    prompts, group = prompts_and_learner(tiny_model_dir, seed=4)
    version = replicas.policy_version.remote().result()
    files_before = shm_files()
    try:
        train_one_step(group, replicas, prompts, seed=30)
        first = sync_weights(group, replicas, version + 1, cfg)
        assert [r["path"] for r in first] == ["ipc"] * REPLICAS
        assert {r["policy_version"] for r in first} == {version + 1}
        assert first[0]["buffers"] >= 1 and first[0]["bytes"] > 0
        assert_serves_learner_weights(group, replicas, prompts, version + 1)
        by_handle = assert_same_as_object_store(group, replicas, version + 2, cfg)

        train_one_step(group, replicas, prompts, seed=40)
        second = sync_weights(group, replicas, version + 3, cfg)
        assert [r["path"] for r in second] == ["ipc"] * REPLICAS
        assert_serves_learner_weights(group, replicas, prompts, version + 3)
        assert checksums(replicas) != by_handle
        assert shm_files() <= files_before  # rank 0 released its buffers once both replicas had loaded them
    finally:
        group.shutdown()
