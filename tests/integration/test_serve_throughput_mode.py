"""Under Ray Serve's throughput mode (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`, which Ray's KubeRay high-throughput
guide sets cluster-wide) a handle's router runs in the caller's event loop, and a handle refuses calls made
outside one. The driver calls its replicas from plain code (`BusyClock.read`'s broadcast, the canary's
`model_info`), so the handles lightning-ray hands out keep their router on a loop of their own
(`inference.replicas.own_loop`).

Ray Serve reads the setting when it is imported, so the check runs in a fresh interpreter: real Ray, real Serve,
a small deployment under the inference deployment's name (no vLLM: the handle is what is tested)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import ray
    from ray import serve

    from lightning_ray.inference.server import DEPLOYMENT_NAME, inference_handle

    @serve.deployment(name=DEPLOYMENT_NAME, ray_actor_options={"num_cpus": 0.1})
    class Replica:
        def model_info(self):
            return {"model": "m"}

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"location": "NoServer"})
        serve.run(Replica.bind(), name="throughput-mode", route_prefix=None)
        try:  # what a plain handle does under this mode, outside an event loop
            serve.get_deployment_handle(DEPLOYMENT_NAME, app_name="throughput-mode").model_info.remote()
            print("plain handle: ok")
        except RuntimeError as err:
            print("plain handle: refused:", str(err).splitlines()[0])
        handle = inference_handle("throughput-mode")
        print("ours:", handle.model_info.remote().result(timeout_s=60))
        print("broadcast:", handle.broadcast("model_info").results(timeout_s=60))
    finally:
        serve.shutdown()
        ray.shutdown()
    """
)


def test_driver_handles_work_under_serve_throughput_mode(tmp_path):
    env = dict(os.environ, RAY_SERVE_THROUGHPUT_OPTIMIZED="1", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)  # its own local cluster, not the session's
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    out = run.stdout
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    # The mode took effect: a handle left to its default refuses a call from plain code...
    assert "plain handle: refused: No event loop running" in out, out
    # ...and the handles lightning-ray hands out answer.
    assert "ours: {'model': 'm'}" in out, out
    assert "broadcast: [{'model': 'm'}]" in out, out
