"""`ray job submit`, exactly as cluster/README.md tells users, on a three-node cluster (`tests/multinode.py`) with
token authentication: a user's YAML that places the inference replica, the learner and the rollout worker on
nodes of their own trains two steps and accounts for every rollout, and a YAML with a misspelt field fails the
job at once with the field named in its logs.

The cluster runs in a process of its own, as a user's does, with the token in a file on its nodes
(`RAY_AUTH_MODE=token`); the CLI finds the same file through `RAY_AUTH_TOKEN_PATH` instead of the user's
`~/.ray/auth_token`. The repo reaches the nodes only as the job's `--working-dir .` (`tests.agents` is the
user's agent code); `lightning_ray` is installed on them, as `ray-cluster.yaml`'s setup commands do."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_ray.config import apply_override
from tests.job_cluster import free_port, http_get, log_tail, stop_cluster, wait_for_job_agent

REPO = Path(__file__).resolve().parents[2]
RUN = [
    "trainer.name=job",
    "trainer.steps=2",
    "trainer.tasks_per_step=2",
    "trainer.checkpoint_every=0",
    "algorithm.group_size=4",
    "algorithm.drop_zero_variance=false",
    "learner.lr=1e-4",
    "inference.sampling.max_tokens=16",
]
# argv: workdir, dashboard port, dashboard agent port, Ray temp dir. Writes workdir/cluster.json once the nodes,
# the tiny model and the tasks are there; stops the cluster on the test's SIGINT. The dashboard binds 127.0.0.1;
# the nodes keep the machine's address: the dashboard agent's own `ray.init` turns a loopback GCS address into
# the machine's, so on a cluster whose GCS listens on 127.0.0.1 only no job ever starts.
SCRIPT = textwrap.dedent(
    """
    import json, signal, sys
    from pathlib import Path

    from tests.multinode import start_cluster

    workdir, dashboard, agent, temp_dir = sys.argv[1:5]
    head = {
        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": int(dashboard),
        "dashboard_agent_listen_port": int(agent),
    }
    cluster, nodes, overrides = start_cluster(workdir, head, temp_dir)
    try:
        (Path(workdir) / "cluster.json").write_text(json.dumps({"nodes": nodes, "overrides": overrides}))
        signal.pause()
    finally:
        cluster.shutdown()
    """
)


def wait_for_file(path: Path, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> Any:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, f"the cluster's process exited:\n{log_tail(log)}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout_s}s:\n{log_tail(log)}"
        time.sleep(1)
    return json.loads(path.read_text())


def user_config(path: Path, overrides: list[str]) -> Path:
    """The YAML a user writes: start_cluster's placement, model and data, without `ray.address` (a job's
    driver joins the cluster it runs on)."""
    raw: dict[str, Any] = {}
    for override in overrides:
        if not override.startswith("ray.address="):
            apply_override(raw, override)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow  # a three-node cluster with a dashboard, then a two-step run in a job: ~4 minutes on 2 cores
def test_job_submit_trains_across_nodes_and_fails_fast_on_a_bad_config(tmp_path):
    token_file = tmp_path / "auth_token"
    token = secrets.token_hex(32)
    token_file.write_text(token)
    # The cluster's nodes and the CLI: token auth with the cluster's token file, no inherited RAY_ADDRESS.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    dashboard, agent = free_port(), free_port()
    address = f"http://127.0.0.1:{dashboard}"
    ray_tmp = tempfile.mkdtemp(prefix="lr-ray-")  # short: Ray's Unix socket paths must fit in 107 bytes
    log = tmp_path / "cluster.log"
    cluster = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(dashboard), str(agent), ray_tmp],
        cwd=REPO,
        env={**env, "DASHBOARD_METRIC_PORT": str(free_port())},
        start_new_session=True,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )

    def ray_cli(*args: str, timeout_s: float = 60, auth_mode: bool = True) -> subprocess.CompletedProcess:
        """`ray <args>` as a user runs it from a checkout (with RAY_AUTH_MODE=token unless told otherwise)."""
        cli_env = env if auth_mode else {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
        return subprocess.run(
            ["ray", *args], cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=timeout_s
        )

    def submit(job_id: str, config: Path, timeout_s: float) -> str:
        """cluster/README.md's command: waits for the job and streams its logs."""
        run = ray_cli(
            *("job", "submit", "--address", address, "--working-dir", ".", "--submission-id", job_id),
            *("--", "lightning-ray", "train", str(config)),
            timeout_s=timeout_s,
        )
        return f"rc={run.returncode}\n{run.stdout}{run.stderr}"

    jobs = ["lr-job-ok", "lr-job-bad-config"]
    try:
        wait_for_job_agent(address, agent, token, cluster, log, f"{ray_tmp}/0")  # the head's temp dir
        info = wait_for_file(tmp_path / "cluster.json", cluster, log)
        assert http_get(f"{address}/api/jobs/", None)[0] == 401  # the Jobs API is closed without the token
        # ...and the CLI sends the token only with RAY_AUTH_MODE=token, as the README's commands set it
        no_mode = ray_cli("job", "list", "--address", address, auth_mode=False)
        assert no_mode.returncode != 0 and "Authentication required" in no_mode.stdout + no_mode.stderr

        ok = user_config(
            tmp_path / "job.yaml", info["overrides"] + RUN + [f"trainer.run_dir={tmp_path}/runs"]
        )
        output = submit(jobs[0], ok, timeout_s=420)
        assert output.startswith("rc=0") and f"Job '{jobs[0]}' succeeded" in output, output[-6000:]
        status = ray_cli("job", "status", "--address", address, jobs[0])
        assert f"Job '{jobs[0]}' succeeded" in status.stdout + status.stderr, status
        logs = ray_cli("job", "logs", "--address", address, jobs[0]).stdout
        assert "step 1/2" in logs and "step 2/2" in logs, logs[-4000:]
        [run_dir] = (tmp_path / "runs" / "job").iterdir()
        summary = json.loads((run_dir / "summary.json").read_text())
        acc = summary["rollouts"]
        assert summary["status"] == "completed" and acc["lost"] == 0, summary
        ended = acc["trained"] + sum(acc["dropped"].values()) + sum(acc["failed"].values())
        assert acc["started"] == ended >= 2 * 4 and acc["leases"] >= acc["started"], summary

        # Each role's actors ran on its node (the state API keeps the ended job's actors).
        listed = ray_cli(
            "list", "actors", "--address", address, "--detail", "--format", "json", "--limit", "1000"
        )
        actors = json.loads(listed.stdout[listed.stdout.index("[") :])
        nodes_of = {
            role: {a["node_id"] for a in actors if a["class_name"].startswith(prefix)}
            for role, prefix in {
                "inference": "ServeReplica:",
                "learner": "LearnerWorker",
                "rollout": "RolloutWorker",
            }.items()
        }
        assert nodes_of == {role: {node} for role, node in info["nodes"].items()}, (nodes_of, info["nodes"])

        bad = user_config(tmp_path / "bad.yaml", info["overrides"] + RUN + ["trainer.stpes=2"])
        started = time.monotonic()
        output = submit(jobs[1], bad, timeout_s=240)
        assert not output.startswith("rc=0") and f"Job '{jobs[1]}' failed" in output, output[-6000:]
        assert time.monotonic() - started < 120, "a config error must fail the job at once"
        status = ray_cli("job", "status", "--address", address, jobs[1])
        assert f"Job '{jobs[1]}' failed" in status.stdout + status.stderr, status
        logs = ray_cli("job", "logs", "--address", address, jobs[1]).stdout
        assert "trainer.stpes: unknown field" in logs, logs[-4000:]
    finally:
        if cluster.poll() is None:
            for job_id in jobs:  # a no-op for an ended job or one never submitted
                with contextlib.suppress(subprocess.TimeoutExpired):
                    ray_cli("job", "stop", "--address", address, "--no-wait", job_id, timeout_s=30)
        stop_cluster(cluster)
        shutil.rmtree(ray_tmp, ignore_errors=True)
