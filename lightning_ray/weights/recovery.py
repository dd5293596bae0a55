"""Replicas lost during a weight update: wait for Serve's replacements and bring every replica to the version.

A replica that dies mid-update fails only its own part of the broadcast (`update_surviving` leaves it out).
Serve starts a replacement, which loads the weights published in the app's registry before it takes traffic
(`lightning_ray.weights.registry`); `converge` then waits, bounded by `inference.weight_sync_timeout_s`, until
the replicas Serve runs (its autoscaling may add or remove some meanwhile) all serve the version: it checks
the version each one serves and pushes the published weights to any that lags (one whose constructor read
the registry just before the publish, or one added after the update was planned). What it cannot fix in time is
a `WeightSyncError` that names the replicas and why.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from lightning_ray.faults import RunFault, first_line
from lightning_ray.inference.replicas import LEAVING, ROUTED, replica_states
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
    """Once every replica Serve routes to serves `version` and none still starting may come up older
    (`awaited`), returns one result per routed replica: the path's result for those it updated (`results`), a
    load of the published weights for any that lagged, and `path: "registry"` for one that loaded them at
    start. Replicas Serve adds or removes meanwhile (a restart, autoscaling) are taken as they come; a replica
    Serve cannot place yet is not waited for, since it will read the registry when it starts. Raises
    `WeightSyncError` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    done = {r["replica"]: r for r in results}
    while True:
        try:
            infos = replicas.broadcast("model_info").results(
                timeout_s=max(1.0, deadline - time.monotonic()), return_exceptions=True
            )
        except DeploymentUnavailableError as err:  # the handle has not seen the replacement yet
            infos = [err]
        lost = [first_line(i) for i in infos if isinstance(i, BaseException)]
        serving = {i["replica"]: i for i in infos if not isinstance(i, BaseException)}
        lagging = {r: i["policy_version"] for r, i in serving.items() if i["policy_version"] < version}
        if lagging:
            done.update({r["replica"]: r for r in push_published(replicas, version, deadline)})
        waiting = awaited(replicas, version, set(serving))
        if not lost and not lagging and not waiting:
            return [done.get(r) or _loaded_at_start(i) for r, i in serving.items()]
        problem = f"replicas serving older versions: {lagging}; unreachable: {lost}; waiting for: {waiting}"
        if time.monotonic() >= deadline:
            raise WeightSyncError(
                f"after {timeout_s:.0f} s (inference.weight_sync_timeout_s) not every replica of app "
                f"{replicas.app_name!r} serves policy version {version}: {problem}"
            )
        time.sleep(POLL_S)


def awaited(replicas: DeploymentHandle, version: int, seen: set[str]) -> dict[str, str]:
    """Replicas (id: why) a sync to `version` must still see: a routed one the handle does not reach yet, and
    a starting one whose constructor read the registry before `version` was published (it would come up on
    an older policy). A starting replica that has not read the registry yet will load `version` itself, and
    one that is stopping takes no more requests: neither is waited for."""
    states = replica_states(replicas.app_name, replicas.deployment_name)
    if states is None:
        return {"*": f"Serve has no deployment {replicas.deployment_name!r} in app {replicas.app_name!r}"}
    started = registry.started_versions(replicas.app_name)
    waiting = {}
    for replica, state in states.items():
        if replica in seen or state in LEAVING:
            continue
        if state in ROUTED:
            waiting[replica] = f"{state}, not reached by the handle yet"
        elif started.get(replica, version) < version:
            waiting[replica] = f"{state} on policy version {started[replica]}"
    return waiting


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
