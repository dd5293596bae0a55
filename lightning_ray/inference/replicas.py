"""Which replicas Serve runs for an inference app, and how many it aims for (`inference.autoscaling`).

Read from the Serve controller's details, the document `serve.status()` is made of: `serve.status()` itself
gives only counts per replica state, while these also name each replica and the autoscaler's target.
"""

from __future__ import annotations

from typing import Any

# States of a replica the router sends requests (and weight updates) to.
ROUTED = frozenset({"RUNNING", "PENDING_MIGRATION"})
# A replica on its way out: it takes no new requests, so the policy it serves no longer matters.
LEAVING = frozenset({"STOPPING", "STOPPED"})


def deployment_details(app_name: str, deployment: str) -> Any | None:
    """Serve's `DeploymentDetails` of `deployment` in app `app_name`; None when Serve runs no such deployment."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    app = ServeInstanceDetails(**client.get_serve_details()).applications.get(app_name)
    return app.deployments.get(deployment) if app is not None else None


def replica_states(app_name: str, deployment: str) -> dict[str, str] | None:
    """Each replica's state by replica id (`InferenceServer.replica`); None when there is no such deployment."""
    details = deployment_details(app_name, deployment)
    if details is None:
        return None
    return {r.replica_id: str(r.state.value) for r in details.replicas}


def replica_counts(app_name: str) -> dict[str, int]:
    """`running`: replicas of the app's inference deployment that take requests; `target`: how many Serve
    aims for (`num_replicas`, or the autoscaler's current decision). Zeros when the app is not deployed.
    For the step metrics `inference/replicas` and `inference/replicas_target`."""
    from lightning_ray.inference.server import DEPLOYMENT_NAME

    details = deployment_details(app_name, DEPLOYMENT_NAME)
    if details is None:
        return {"running": 0, "target": 0}
    running = sum(1 for r in details.replicas if r.state.value in ROUTED)
    return {"running": running, "target": details.target_num_replicas}


def own_loop(handle: Any) -> Any:
    """`handle`, its router on an event loop of its own (Ray Serve's default). The driver calls the replicas
    from plain code (`.remote().result()`, `broadcast`), which a handle whose router runs in the caller's event
    loop refuses outside one ("No event loop running"); Ray Serve's throughput mode
    (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`, which its KubeRay high-throughput guide sets cluster-wide) makes that
    the default. A handle chooses once, before its first call, and only through Serve's private `_init`
    (`tests/integration/test_serve_throughput_mode.py` fails if a Ray upgrade changes it); one already in use
    is returned as it is."""
    if not handle.is_initialized:
        handle._init(_run_router_in_separate_loop=True)
    return handle
