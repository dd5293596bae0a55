"""`placement` on a real multi-node Ray cluster (`tests/multinode.py`: three raylets, each with its own object
store, on this machine): the check passes for placements the nodes satisfy and names the role that no node can
host, and the inference replica, the rollout worker and the learner each start on the node their placement
names."""

from __future__ import annotations

import textwrap

import pytest

from tests.multinode import run_script

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray import serve

    from lightning_ray.config import load_config
    from lightning_ray.learner.group import LearnerGroup
    from lightning_ray.models import resolve_model
    from lightning_ray.resources import PlacementError
    from lightning_ray.rollouts.stack import deploy_policies, stop_rollout_stack
    from lightning_ray.rollouts.supervisor import RolloutWorkers
    from lightning_ray.runtime import init_ray
    from lightning_ray.tasks.actor import task_pool_from_config
    from tests.multinode import start_cluster

    def node_of(actor):
        return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))

    cluster, nodes, overrides = start_cluster(sys.argv[1])
    cfg = load_config(None, overrides, check_files=False)
    init_ray(cfg)  # joins the cluster and checks the placement against ray.nodes()
    out = {"nodes": nodes}
    try:
        init_ray(load_config(None, overrides + ["learner.placement.labels={pool: eval}"], check_files=False))
    except PlacementError as e:
        out["error"] = str(e)
    deploy_policies(cfg)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
    out["inference"] = [node_of(ray.get_actor(a["name"], namespace=a["namespace"])) for a in replicas]
    pool = task_pool_from_config(cfg)
    workers = RolloutWorkers(cfg, pool)
    try:
        out["rollout"] = [node_of(w) for w in workers.handles]
    finally:
        stop_rollout_stack(cfg, workers, [pool])
    learners = LearnerGroup(cfg.learner, resolve_model(cfg.model.path), timeout_s=120)
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
    out = run_script(SCRIPT, tmp_path)
    nodes = out["nodes"]
    assert (
        "learner.placement: 1 actor(s) each needing CPU=0.5, learner_node=1, label pool=eval" in out["error"]
    )
    assert "inference.placement" not in out["error"] and "rollout.placement" not in out["error"]
    assert out["inference"] == [nodes["inference"]]
    assert out["rollout"] == [nodes["rollout"]]
    assert out["learner"] == [nodes["learner"]]
