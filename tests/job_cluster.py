"""Helpers for tests that start a Ray cluster with a dashboard in a process of their own and talk to its Jobs
API the way a user does (`ray job submit` with the cluster's token).

Every port the head would otherwise take at a fixed default (GCS 6379, dashboard 8265, dashboard agent 52365,
client server 10001, dashboard metrics 44227) is picked free: another Ray cluster on the same machine (the
session's `ray.init()` fixture, a benchmark) holds the defaults, and a head whose dashboard agent cannot bind
its HTTP port never registers the agent, so every submission answers "No available agent to submit job".
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, token: str | None) -> tuple[int, str]:
    """(status, body) of a GET, with the cluster's token when given; (0, reason) while nothing answers."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def log_tail(path: Path, chars: int = 3000) -> str:
    return f"--- {path.name}:\n{path.read_text(errors='replace')[-chars:]}\n" if path.exists() else ""


def wait_for_job_agent(
    address: str,
    agent_port: int,
    token: str,
    head: subprocess.Popen,
    head_log: Path,
    ray_tmp: str,
    timeout_s: float = 240,
) -> None:
    """Wait until a submission can reach the head node's job agent. The dashboard's job module forwards every
    submission to the agent whose address the head's dashboard agent writes to the GCS once its HTTP server is
    bound, on the node the dashboard has recorded as head; it gives up after 10 s with "No available agent".
    So: the job API answers, the dashboard knows the head node is alive, and the agent serves HTTP."""
    checks = {
        "job API": f"{address}/api/jobs/",
        "head node": f"{address}/nodes?view=summary",
        "job agent": f"http://127.0.0.1:{agent_port}/api/healthz",
    }
    deadline = time.monotonic() + timeout_s
    last: dict[str, tuple[int, str]] = {}
    while time.monotonic() < deadline:
        assert head.poll() is None, f"the cluster's process exited:\n{log_tail(head_log)}"
        last = {name: http_get(url, token) for name, url in checks.items()}
        if all(status == 200 for status, _ in last.values()) and head_node_alive(last["head node"][1]):
            return
        time.sleep(1)
    logs = Path(ray_tmp) / "session_latest" / "logs"
    raise TimeoutError(
        f"the head's job agent was not ready in {timeout_s}s; last answers: {last}\n"
        + log_tail(logs / "dashboard_agent.log")
        + log_tail(logs / "dashboard.log")
        + log_tail(head_log)
    )


def head_node_alive(summary_body: str) -> bool:
    nodes = json.loads(summary_body).get("data", {}).get("summary", [])
    return any(n.get("raylet", {}).get("isHeadNode") and n["raylet"].get("state") == "ALIVE" for n in nodes)


def stop_cluster(head: subprocess.Popen) -> None:
    """Stop the process that runs the cluster (started with `start_new_session=True`) and everything it started,
    and nothing else (`ray stop` would stop every Ray on the machine). SIGINT to its process group stops the
    GCS, raylets and dashboard; workers, vLLM and a job's driver run in process groups of their own, so whatever
    of the process tree outlives that is killed by pid."""
    try:
        tree = psutil.Process(head.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGINT)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    _, alive = psutil.wait_procs(tree, timeout=20)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
