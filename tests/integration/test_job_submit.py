"""`ray job submit --working-dir .` runs the same YAML on a real (single-node) Ray cluster started by `ray start`
with every port picked free (`tests/job_cluster.py` says why)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.job_cluster import free_port, stop_cluster, wait_for_job_agent

REPO = Path(__file__).resolve().parents[2]
# The working-dir package: .gitignore (runs/, wandb/, caches) is honoured by Ray too; these keep big outputs
# out even in a checkout without it.
EXCLUDES = [".git", "runs", "wandb", "benchmarks/results", "**/__pycache__", "*.egg-info"]
WORKING_DIR_MAX_BYTES = 20 * 2**20


def extracted_working_dir(ray_tmp: str) -> Path:
    """The working-dir package as the head unpacked it for the job."""
    [pkg] = [
        p
        for p in (Path(ray_tmp) / "session_latest" / "runtime_resources" / "working_dir_files").iterdir()
        if p.is_dir()
    ]
    return pkg


@pytest.mark.slow  # CI time (~170-300 s); the CLI path it submits is the train loop CI runs in test_train_loop.py
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
