"""Replicas lost during a weight update: wait for Serve's replacements and bring every replica to the version.

A replica that dies mid-update fails only its own part of the broadcast (`update_surviving` leaves it out).
Serve starts a replacement, which loads the weights published in the app's registry before it takes traffic
(`lightning_ray.weights.registry`); `converge` then waits, bounded by `inference.weight_sync_timeout_s`, until
Serve runs every replica again, checks the version each one serves, and pushes the published weights to any
that lags (one whose constructor read the registry just before the publish). What it cannot fix in time is
a `WeightSyncError` that names the replicas and why.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from lightning_ray.faults import RunFault, first_line
from lightning_ray.weights import registry
from lightning_ray.weights.base import update_replicas

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

POLL_S = 1.0
log = logging.getLogger(__name__)


class WeightSyncError(RunFault):
    """Some replica does not serve the version a weight update published, and did not come to in time."""


def replica_lost(err: BaseException) -> bool:
    """The replica behind a failed call is gone (its actor died or Serve dropped it) or its vLLM engine died:
    Serve replaces it, so the call may go again elsewhere."""
    if isinstance(err, RayTaskError) and err.cause is not None:
        err = err.cause
    return isinstance(err, RayActorError | ReplicaUnavailableError) or type(err).__name__ == "EngineDeadError"


def update_lost(err: BaseException) -> bool:
    """A weight update failed because a replica was lost, or because Serve runs none right now."""
    return replica_lost(err) or isinstance(err, DeploymentUnavailableError)


def update_surviving(
    replicas: DeploymentHandle, path: str, payload: Any, version: int, timeout_s: float | None, **kw: Any
) -> list[dict[str, Any]]:
    """`update_replicas`, except that a replica lost on the way is left out (with a warning: `converge` brings
    its replacement up to date); any other failure is raised."""
    try:
        results = update_replicas(replicas, path, payload, version, timeout_s, return_exceptions=True, **kw)
    except DeploymentUnavailableError as err:  # Serve runs no replica right now: all were lost
        log.warning("no replica to update to policy version %d: %s", version, first_line(err))
        return []
    failed = [r for r in results if isinstance(r, BaseException)]
    for err in failed:
        if not replica_lost(err):
            raise err
    for err in failed:
        log.warning("a replica was lost during the update to policy version %d: %s", version, first_line(err))
    return [r for r in results if not isinstance(r, BaseException)]


def converge(
    replicas: DeploymentHandle, version: int, timeout_s: float, results: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Once Serve runs every replica of the deployment, each serves `version`: the path's result for those it
    updated (`results`), a load of the published weights for any that lagged, and `path: "registry"` for a
    replacement that loaded them at start. Raises `WeightSyncError` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    done = {r["replica"]: r for r in results}
    while True:
        problem = not_running(replicas)
        if problem is None:
            try:
                infos = replicas.broadcast("model_info").results(
                    timeout_s=max(1.0, deadline - time.monotonic()), return_exceptions=True
                )
            except DeploymentUnavailableError as err:  # the handle has not seen the replacement yet
                infos = [err]
            lost = [first_line(i) for i in infos if isinstance(i, BaseException)]
            lagging = {
                i["replica"]: i["policy_version"]
                for i in infos
                if not isinstance(i, BaseException) and i["policy_version"] < version
            }
            if not lost and not lagging:
                return [done.get(i["replica"]) or _loaded_at_start(i) for i in infos]
            if lagging:
                done.update({r["replica"]: r for r in push_published(replicas, version, deadline)})
            problem = f"replicas serving older versions: {lagging}; unreachable: {lost}"
        if time.monotonic() >= deadline:
            raise WeightSyncError(
                f"after {timeout_s:.0f} s (inference.weight_sync_timeout_s) not every replica of app "
                f"{replicas.app_name!r} serves policy version {version}: {problem}"
            )
        time.sleep(POLL_S)


def push_published(replicas: DeploymentHandle, version: int, deadline: float) -> list[dict[str, Any]]:
    """The replicas below `version` load the app's published weights (the others skip it)."""
    from lightning_ray.weights import object_store

    published = registry.current(replicas.app_name)
    if published is None or published.version != version:
        raise WeightSyncError(
            f"app {replicas.app_name!r} has no published weights of policy version {version} to bring a "
            f"restarted replica to (published: {published.version if published else None})"
        )
    payload = {"state": published.state}
    timeout = max(1.0, deadline - time.monotonic())
    pushed = update_surviving(replicas, object_store.NAME, payload, version, timeout, if_older=True)
    return [{**r, "path": "object_store_recovery"} for r in pushed if not r.get("skipped")]


def not_running(replicas: DeploymentHandle) -> str | None:
    """None when Serve runs every replica of the deployment (healthy, none starting or stopping), else what
    it reports."""
    from ray import serve

    app = serve.status().applications.get(replicas.app_name)
    deployment = app.deployments.get(replicas.deployment_name) if app is not None else None
    if deployment is None:
        return f"Serve has no deployment {replicas.deployment_name!r} in app {replicas.app_name!r}"
    states = dict(deployment.replica_states)
    if deployment.status == "HEALTHY" and set(states) == {"RUNNING"}:
        return None
    return f"deployment {deployment.status} with replicas {states} ({deployment.message or 'no message'})"


def _loaded_at_start(info: dict[str, Any]) -> dict[str, Any]:
    return {
        "replica": info["replica"],
        "policy_version": info["policy_version"],
        "path": "registry",
        "total_s": 0.0,
    }
