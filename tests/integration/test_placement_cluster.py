"""`placement` on a real multi-node Ray cluster (`ray.cluster_utils.Cluster`: three raylets, each with its own
object store, on this machine): the check passes for placements the nodes satisfy and names the role that no node
can host, and the inference replica, the rollout worker and the learner each start on the node their placement
names. Runs in a subprocess of its own: the test session's Ray cluster stays untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from lightning_ray.config import load_config
    from lightning_ray.learner.group import LearnerGroup
    from lightning_ray.models import make_tiny_model
    from lightning_ray.resources import PlacementError
    from lightning_ray.rollouts.stack import deploy_policies, stop_rollout_stack
    from lightning_ray.rollouts.supervisor import RolloutWorkers
    from lightning_ray.runtime import init_ray
    from lightning_ray.tasks.actor import task_pool_from_config

    STORE = 256 * 1024**2

    def node_of(actor):
        return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"inference_node": 1}, "include_dashboard": False,
                        "object_store_memory": STORE},
    )
    learner_node = cluster.add_node(
        num_cpus=2, resources={"learner_node": 1}, labels={"pool": "train"}, object_store_memory=STORE
    )
    rollout_node = cluster.add_node(num_cpus=2, resources={"rollout_node": 2}, object_store_memory=STORE)
    cluster.wait_for_nodes()
    model = make_tiny_model(sys.argv[1] + "/model")
    data = sys.argv[1] + "/tasks.jsonl"
    open(data, "w").write("".join(json.dumps({"id": f"t{i}", "question": f"{i}+{i}"}) + "\\n" for i in range(4)))
    overrides = [
        f"ray.address={cluster.address}", f"model.path={model}", "model.dtype=float32", f"data.train={data}",
        "data.val=null", "inference.max_model_len=512", "inference.num_cpus_per_replica=0.5",
        "inference.placement.resources={inference_node: 0.5}",
        "learner.num_cpus_per_worker=0.5", "learner.placement={resources: {learner_node: 1}, labels: {pool: train}}",
        "rollout.num_workers=1", "rollout.agent=tests.agents:varied_agent",
        "rollout.placement.resources={rollout_node: 1}",
    ]
    cfg = load_config(None, overrides, check_files=False)
    init_ray(cfg)  # joins the cluster and checks the placement against ray.nodes()
    out = {"nodes": {"head": cluster.head_node.node_id, "learner": learner_node.node_id,
                     "rollout": rollout_node.node_id}}
    try:
        init_ray(load_config(None, overrides + ["learner.placement.labels={pool: eval}"], check_files=False))
    except PlacementError as e:
        out["error"] = str(e)
    inference = deploy_policies(cfg)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
    out["inference"] = [node_of(ray.get_actor(a["name"], namespace=a["namespace"])) for a in replicas]
    pool = task_pool_from_config(cfg)
    workers = RolloutWorkers(cfg, pool)
    try:
        out["rollout"] = [node_of(w) for w in workers.handles]
    finally:
        stop_rollout_stack(cfg, workers, [pool])
    learners = LearnerGroup(cfg.learner, model, timeout_s=120)
    try:
        out["learner"] = [node_of(w) for w in learners.workers]
    finally:
        learners.shutdown()
    print("RESULT " + json.dumps(out), flush=True)
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    """
)


@pytest.mark.slow  # a three-node cluster, a vLLM replica and a DeepSpeed learner: ~2 minutes
def test_roles_start_on_the_nodes_their_placement_names(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    nodes = out["nodes"]
    assert (
        "learner.placement: 1 actor(s) each needing CPU=0.5, learner_node=1, label pool=eval" in out["error"]
    )
    assert "inference.placement" not in out["error"] and "rollout.placement" not in out["error"]
    assert out["inference"] == [nodes["head"]]
    assert out["rollout"] == [nodes["rollout"]]
    assert out["learner"] == [nodes["learner"]]
