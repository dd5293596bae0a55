"""A three-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a raylet and an object store per node)
for tests that need roles on different nodes. `start_cluster` runs inside a test's own subprocess (`run_script`),
so the test session's Ray cluster stays untouched; the script prints one `RESULT {json}` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STORE = 256 * 1024**2  # object store per node


def start_cluster(
    workdir: str, head_args: dict[str, Any] | None = None, temp_dir: str | None = None
) -> tuple[Any, dict[str, str], list[str]]:
    """Head (inference_node), a learner node (learner_node, label pool=train) and a rollout node (rollout_node x2),
    2 CPUs each; a tiny model and four tasks in `workdir`. `head_args` add to or replace the head's arguments (a
    dashboard). `temp_dir`: each node gets a Ray temp dir of its own under it (`0` the head), as separate machines
    have; a job's `--working-dir` needs that: each node unpacks it when a worker there first needs it, replacing
    the folder, which on one shared temp dir deletes the job driver's working directory under it. Returns the
    cluster, each role's node id, and config overrides that join it and place every role on its node."""
    from ray.cluster_utils import Cluster

    from lightning_ray.models import make_tiny_model

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "resources": {"inference_node": 1},
            "include_dashboard": False,
            "object_store_memory": STORE,
            **own_temp_dir(temp_dir, 0),
            **(head_args or {}),
        },
    )
    learner = cluster.add_node(
        num_cpus=2,
        resources={"learner_node": 1},
        labels={"pool": "train"},
        object_store_memory=STORE,
        **own_temp_dir(temp_dir, 1),
    )
    rollout = cluster.add_node(
        num_cpus=2, resources={"rollout_node": 2}, object_store_memory=STORE, **own_temp_dir(temp_dir, 2)
    )
    cluster.wait_for_nodes()
    model = make_tiny_model(Path(workdir) / "model")
    data = Path(workdir) / "tasks.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "question": f"{i}+{i}"}) + "\n" for i in range(4)))
    overrides = [
        f"ray.address={cluster.address}",
        f"model.path={model}",
        "model.dtype=float32",
        f"data.train={data}",
        "data.val=null",
        "inference.max_model_len=512",
        "inference.num_cpus_per_replica=0.5",
        "inference.placement.resources={inference_node: 0.5}",
        "learner.num_cpus_per_worker=0.5",
        "learner.placement={resources: {learner_node: 1}, labels: {pool: train}}",
        "rollout.num_workers=1",
        "rollout.agent=tests.agents:varied_agent",
        "rollout.placement.resources={rollout_node: 1}",
    ]
    nodes = {"inference": cluster.head_node.node_id, "learner": learner.node_id, "rollout": rollout.node_id}
    return cluster, nodes, overrides


def own_temp_dir(temp_dir: str | None, node: int) -> dict[str, str]:
    return {"temp_dir": str(Path(temp_dir) / str(node))} if temp_dir else {}


def run_script(script: str, workdir: Path, timeout_s: float = 900) -> dict[str, Any]:
    """Run `script` (given `workdir` as argv[1]) in a fresh Python with the repo on its path; its RESULT."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run(
        [sys.executable, "-c", script, str(workdir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))
