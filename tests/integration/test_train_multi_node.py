"""`train` on a three-node Ray cluster (`tests/multinode.py`) with the inference replica, the learner and the
rollout worker each on a node of its own: two steps with each weight path that crosses nodes (the object store,
a gloo collective), and the same-node `ipc` path refused with an error that says why and what to use."""

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
    from lightning_ray.loop import train
    from tests.multinode import start_cluster

    cluster, nodes, overrides = start_cluster(sys.argv[1])
    run = overrides + [
        f"trainer.run_dir={sys.argv[1]}/runs", "trainer.steps=2", "trainer.tasks_per_step=2",
        "trainer.checkpoint_every=0", "algorithm.group_size=4", "algorithm.drop_zero_variance=false",
        "learner.lr=1e-4", "inference.sampling.max_tokens=16",
    ]
    out = {}
    for path in ("object_store", "collective"):
        rows = train(load_config(None, run + [f"inference.weight_sync={path}", f"trainer.name={path}"],
                                 check_files=False))
        out[path] = [{"step": r["step"], "version": r.get("rollout/policy_version")} for r in rows]
    try:
        train(load_config(None, run + ["inference.weight_sync=ipc", "trainer.name=ipc"], check_files=False))
        out["ipc"] = "no error"
    except BaseException as e:
        out["ipc"] = f"{type(e).__name__}: {e}"
    print("RESULT " + json.dumps(out), flush=True)
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    """
)


@pytest.mark.slow  # three short runs on a three-node cluster: ~5 minutes on 2 cores
def test_train_across_nodes_with_each_weight_path(tmp_path):
    out = run_script(SCRIPT, tmp_path, timeout_s=1500)
    for path in ("object_store", "collective"):
        assert [r["step"] for r in out[path]] == [1, 2], out
        assert out[path][1]["version"] == 1, out  # step 2 sampled from the weights step 1 sent across nodes
    assert "needs every vLLM replica on the node of learner rank 0" in out["ipc"], out["ipc"]
    assert "use inference.weight_sync=collective or object_store across nodes" in out["ipc"], out["ipc"]
