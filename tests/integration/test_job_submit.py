"""`ray job submit --working-dir .` runs the same YAML on a real (single-node) Ray cluster started by `ray start`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_dashboard(
    address: str, head: subprocess.Popen, log: Path, env: dict[str, str], timeout_s: float = 120
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert head.poll() is None, f"ray start --head exited: {log.read_text()[-3000:]}"
        probe = subprocess.run(
            ["ray", "job", "list", "--address", address], capture_output=True, text=True, env=env
        )
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise TimeoutError(f"the Ray dashboard at {address} did not come up in {timeout_s}s")


@pytest.mark.slow  # minutes; on this sandbox the head's job agent did not come up in time under load
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
    dashboard = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="lr-ray-")  # short: Ray's Unix socket paths must fit in 107 bytes
    address = f"http://127.0.0.1:{dashboard}"
    head_log = tmp_path / "ray-head.log"
    # Ray 2.60 clusters require token auth: the head and every CLI call share one token.
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
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
        wait_for_dashboard(address, head, head_log, env)
        runtime_env = json.dumps(
            {
                "excludes": [".git", "runs", "wandb", "benchmarks/results"],
                "env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"},
            }
        )
        for _ in range(20):  # the dashboard answers before its job agent is ready on a fresh head
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
                timeout=900,
                env=env,
            )
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in (job.stdout + job.stderr)
        [run_dir] = list((tmp_path / "runs" / "job").iterdir())
        assert (run_dir / "checkpoints" / "step-000001" / "model.safetensors").exists()
    finally:
        os.killpg(head.pid, signal.SIGINT)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
