"""`ray job submit --working-dir .` runs the same YAML on a real (single-node) Ray cluster started by `ray start`.

Every port the head would otherwise take at a fixed default (GCS 6379, dashboard 8265, dashboard agent 52365,
client server 10001, dashboard metrics 44227) is picked free: another Ray cluster on the same machine (the
session's `ray.init()` fixture, a benchmark) holds the defaults, and a head whose dashboard agent cannot bind
its HTTP port never registers the agent, so every submission answers "No available agent to submit job".
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[2]
# The working-dir package: .gitignore (runs/, wandb/, caches) is honoured by Ray too; these keep big outputs
# out even in a checkout without it.
EXCLUDES = [".git", "runs", "wandb", "benchmarks/results", "**/__pycache__", "*.egg-info"]
WORKING_DIR_MAX_BYTES = 20 * 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, token: str) -> tuple[int, str]:
    """(status, body) of a GET with the cluster's token; (0, reason) while nothing answers."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
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
        assert head.poll() is None, f"ray start --head exited:\n{log_tail(head_log)}"
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
    """Stop everything `ray start --block` started, and nothing else (`ray stop` would stop every Ray on the
    machine). SIGINT to its process group stops the GCS, raylet and dashboard; workers, vLLM and the job's
    driver run in process groups of their own, so whatever of the process tree outlives that is killed by pid."""
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


def extracted_working_dir(ray_tmp: str) -> Path:
    """The working-dir package as the head unpacked it for the job."""
    [pkg] = [
        p
        for p in (Path(ray_tmp) / "session_latest" / "runtime_resources" / "working_dir_files").iterdir()
        if p.is_dir()
    ]
    return pkg


def test_ray_job_submit_trains_and_checkpoints(tiny_model_dir, tmp_path):
    data = tmp_path / "tasks.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"t{i}", "question": f"{i} plus {i}?"}) + "\n" for i in range(4))
    )
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(tiny_model_dir), "dtype": "float32"},
                "inference": {
                    "num_cpus_per_replica": 0.5,
                    "max_model_len": 512,
                    "sampling": {"max_tokens": 8},
                },
                "rollout": {"agent": "tests.agents:varied_agent", "num_workers": 1, "concurrency": 8},
                "data": {"train": str(data), "val": None},
                "algorithm": {"group_size": 4},
                "learner": {"num_cpus_per_worker": 0.5, "lr": 1e-4},
                "trainer": {
                    "name": "job",
                    "run_dir": str(tmp_path / "runs"),
                    "steps": 1,
                    "tasks_per_step": 2,
                },
            }
        )
    )
    dashboard, agent_port = free_port(), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="lr-ray-")  # short: Ray's Unix socket paths must fit in 107 bytes
    address = f"http://127.0.0.1:{dashboard}"
    head_log = tmp_path / "ray-head.log"
    token = secrets.token_hex(16)
    # Ray 2.60 clusters require token auth: the head and every CLI call share one token. No inherited
    # RAY_ADDRESS: the CLI calls name --address, and the head's processes must not point at another cluster.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, DASHBOARD_METRIC_PORT=str(free_port()))
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            f"--port={free_port()}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent_port}",
            f"--ray-client-server-port={free_port()}",
            "--num-cpus=6",
            f"--temp-dir={ray_tmp}",
            "--disable-usage-stats",
        ],
        start_new_session=True,
        stdout=head_log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        wait_for_job_agent(address, agent_port, token, head, head_log, ray_tmp)
        runtime_env = json.dumps({"excludes": EXCLUDES, "env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}})
        job = subprocess.run(
            [
                "ray",
                "job",
                "submit",
                "--address",
                address,
                "--working-dir",
                str(REPO),
                "--runtime-env-json",
                runtime_env,
                "--",
                "lightning-ray",
                "train",
                str(config),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        output = job.stdout + job.stderr
        assert job.returncode == 0, output[-6000:]
        assert "succeeded" in output, output[-6000:]
        [run_dir] = list((tmp_path / "runs" / "job").iterdir())
        assert (run_dir / "checkpoints" / "step-000001" / "model.safetensors").exists()

        pkg = extracted_working_dir(ray_tmp)
        assert (pkg / "lightning_ray" / "loop.py").exists() and (pkg / "tests" / "agents.py").exists()
        assert not any((pkg / name).exists() for name in (".git", "runs", "wandb"))
        size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
        assert size < WORKING_DIR_MAX_BYTES, f"working-dir package is {size / 2**20:.1f} MiB"
    finally:
        stop_cluster(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)
