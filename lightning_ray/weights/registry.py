"""The policy every replica of an inference app must serve: a small named actor per Serve app.

Every weight update publishes `(version, state)` here before the replicas load it, where `state` is the object
ref of the HF-named state dict (the object store path's own `ray.put`; the other paths publish a copy). A
replica that Serve starts later (a restart after a crash, one more replica) reads the registry in its
constructor and loads that state before Serve routes it any traffic, so it never serves the starting weights
of an older version (`InferenceServer.__init__`). Each of those reads records the version the replica serves
then: one that read just before a publish, and was not yet running for the update that followed, is found
this way and brought up to date by `recovery.converge`, which need not wait for any other starting replica.

Lifetimes: the registry is created by the driver (`reset`, called when the app is deployed, or the first
`publish`), which keeps a handle to it, so it lives as long as the driver; replicas only look it up, since an
actor a replica created would die with that replica. The registry holds the ref (wrapped in a list, so Ray
passes it unresolved) and with it the object, as long as the object's owner lives: learner rank 0 for a
learner's state, the driver for one it put itself; both outlive a replica restart.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import RayServeException

NAMESPACE = "lightning-ray"


class PublishedWeightsUnavailable(RuntimeError):
    """A replica could not load the weights its app serves (e.g. their owner died): it must not serve older
    ones, so it fails to start and Serve reports the deployment unhealthy."""


@dataclass(frozen=True)
class Published:
    """The policy version an app's replicas must serve, and its weights (a one-element list of a ref)."""

    version: int
    state: list[ray.ObjectRef]


class WeightRegistry:
    """The Ray actor behind one app's registry (one value, replaced by each publish)."""

    def __init__(self) -> None:
        self.published: Published | None = None
        self.started: dict[str, int] = {}  # replica id -> the version it served when it last read `published`

    def publish(self, version: int, state: list[ray.ObjectRef]) -> None:
        if self.published is not None and version < self.published.version:
            raise ValueError(
                f"weights of version {version} published after version {self.published.version}: versions "
                "only go up"
            )
        self.published = Published(version, state)

    def current(self) -> Published | None:
        return self.published

    def current_for(self, replica: str, serving: int) -> Published | None:
        self.started[replica] = serving
        return self.published

    def started_versions(self) -> dict[str, int]:
        return dict(self.started)

    def clear(self) -> None:
        self.published = None
        self.started.clear()


def registry_name(app_name: str) -> str:
    return f"weights-{app_name}"


# The driver's handles, by Ray job and app: a named actor that is not detached ends when its creator holds no
# handle to it (and a handle of an earlier `ray.init` in this process is of no use).
_handles: dict[tuple[str, str], Any] = {}


def _registry(app_name: str) -> Any:
    """The app's registry actor, created by this process (the driver) if it does not exist yet; this process
    keeps a handle to it, which keeps it alive as long as the driver runs."""
    key = (ray.get_runtime_context().get_job_id(), app_name)
    if key not in _handles:
        _handles[key] = (
            ray.remote(WeightRegistry)
            .options(name=registry_name(app_name), namespace=NAMESPACE, get_if_exists=True, num_cpus=0)
            .remote()
        )
    return _handles[key]


def publish(app_name: str, version: int, state: ray.ObjectRef, timeout_s: float = 60.0) -> None:
    """From the driver: `state` (a ref of an HF-named state dict) is what the app's replicas serve as `version`."""
    ray.get(_registry(app_name).publish.remote(version, [state]), timeout=timeout_s)


def reset(app_name: str, timeout_s: float = 60.0) -> None:
    """From the driver, when it deploys the app: its replicas start on the weights of the model folder."""
    ray.get(_registry(app_name).clear.remote(), timeout=timeout_s)


def current(app_name: str, timeout_s: float = 60.0) -> Published | None:
    """From the driver: what was last published for the app, None if nothing was."""
    return ray.get(_registry(app_name).current.remote(), timeout=timeout_s)


def started_versions(app_name: str, timeout_s: float = 60.0) -> dict[str, int]:
    """From the driver: the version each replica of the app served when its constructor last read the
    registry (replicas that have not read it yet are not listed)."""
    return ray.get(_registry(app_name).started_versions.remote(), timeout=timeout_s)


async def lookup(replica: str, serving: int, timeout_s: float = 60.0) -> Published | None:
    """From the constructor of Serve replica `replica` (on its event loop), which serves version `serving`:
    what its app serves now; None when nothing was published (the starting weights), outside Serve, or when
    the app has no registry (deployed without the driver's `reset`)."""
    try:
        actor = ray.get_actor(registry_name(serve.get_replica_context().app_name), namespace=NAMESPACE)
    except (RayServeException, ValueError):  # not in a replica; no registry
        return None
    return await asyncio.wait_for(actor.current_for.remote(replica, serving), timeout_s)
