"""New weights from the learners to every inference replica: the one call the GRPO loop makes after a step.

`inference.weight_sync` picks the path:

* `object_store` — learner rank 0 `ray.put`s the state dict once; every replica reloads it (no per-replica copy).
* `collective` — learner rank 0 broadcasts the tensors through a process group whose other ranks are the vLLM
  workers of every replica (`lightning_ray.weight_group`: gloo on CPU, NCCL on GPUs). The group is built at
  the first sync and reused; before each update the driver checks that every live replica is in it with the
  learner, and rebuilds it when not (a replica restarted or was added, the learner restarted). An update that
  fails in the group (a rank died or timed out mid-transfer) goes through the object store instead, with a
  warning, and the group is rebuilt at the next update: the replicas always end up with the new weights.
* `ipc` — learner rank 0 and the vLLM workers share one machine (and, on GPUs, one GPU): rank 0 packs the
  tensors into a few buffers and hands every worker handles to them (CUDA IPC on a GPU, shared-memory files on
  the host; `lightning_ray.weight_ipc`). Only the handles travel, through the driver; rank 0 keeps the buffers
  until every replica has loaded them. A replica on another node (or GPU) than rank 0 is an error.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from lightning_ray.config import Config, InferenceConfig, LearnerConfig
from lightning_ray.inference.server import broadcast_weights
from lightning_ray.learner.group import LearnerGroup

log = logging.getLogger(__name__)
# The driver waits this many per-operation timeouts for one update (drain, then the transfer) before it gives
# up on the group; every rank's own operations fail after one timeout, so this only guards the unforeseen.
DRIVER_TIMEOUTS = 3
GROUP_FAILURES = (ray.exceptions.RayError, TimeoutError)


def sync_weights(learners: LearnerGroup, handle: Any, version: int, cfg: Config) -> list[dict[str, Any]]:
    """Bring every replica of `handle` to the learners' current weights, serving `version` afterwards.
    Returns one result per replica (`path` says how its weights travelled)."""
    backend = group_backend(cfg.learner, cfg.inference)
    if cfg.inference.weight_sync == "collective":
        return collective_sync(learners, handle, version, backend, cfg.inference.weight_sync_timeout_s)
    if cfg.inference.weight_sync == "ipc":
        return ipc_sync(learners, handle, version, backend, cfg.inference.weight_sync_timeout_s)
    return object_store_sync(learners, handle, version)


def object_store_sync(learners: LearnerGroup, handle: Any, version: int) -> list[dict[str, Any]]:
    results = broadcast_weights(learners.state_dict_ref(), version, handle)
    return [{**r, "path": "object_store"} for r in results]


def group_backend(learner: LearnerConfig, inference: InferenceConfig) -> str:
    """NCCL when both sides hold GPUs, gloo otherwise (then the tensors travel through host memory). For the
    ipc hand-off the same choice says where rank 0's buffers live: its GPU under nccl, host memory under gloo."""
    return "nccl" if learner.num_gpus_per_worker > 0 and inference.num_gpus_per_replica > 0 else "gloo"


def collective_sync(
    learners: LearnerGroup, handle: Any, version: int, backend: str, timeout_s: float
) -> list[dict[str, Any]]:
    """The update through the weight group (built or rebuilt first when needed); on a failure in the group,
    this update goes through the object store and the group is left, to be rebuilt at the next update."""
    try:
        group_id = ensure_weight_group(learners, handle, backend, timeout_s)
        return broadcast_through_group(learners, handle, group_id, version, timeout_s)
    except GROUP_FAILURES as e:
        log.warning(
            "collective weight sync of version %d failed (%s: %s); this update goes through the object store "
            "and the weight group is rebuilt at the next one",
            version,
            type(e).__name__,
            e,
        )
        close_weight_sync(learners, handle, timeout_s)
        return [{**r, "path": "object_store_fallback"} for r in object_store_sync(learners, handle, version)]


def ensure_weight_group(learners: LearnerGroup, handle: Any, backend: str, timeout_s: float) -> str:
    """The id of a weight group holding learner rank 0 and exactly the live replicas' workers, building a new
    one when the current group (if any) does not."""
    replicas = handle.broadcast("weight_group_status", backend).results(timeout_s=timeout_s)
    spec = learners.weight_group_spec()
    if spec is not None and spec["backend"] == backend and group_matches(spec, replicas):
        return spec["group_id"]
    return build_weight_group(learners, handle, replicas, backend, timeout_s)


def group_matches(spec: dict[str, Any], replicas: list[dict[str, Any]]) -> bool:
    """Every live replica is in the learner's group, and the group has no rank beyond them."""
    in_group = all(r["group_id"] == spec["group_id"] for r in replicas)
    return in_group and spec["world_size"] == 1 + sum(r["workers"] for r in replicas)


def rank_offsets(replicas: list[dict[str, Any]]) -> dict[str, int]:
    """Consecutive ranks after the learner's 0: each replica's first worker rank, in replica-id order."""
    offsets, next_rank = {}, 1
    for r in sorted(replicas, key=lambda r: r["replica"]):
        offsets[r["replica"]] = next_rank
        next_rank += r["workers"]
    return offsets


def check_distinct_devices(learner_device: str | None, replicas: list[dict[str, Any]]) -> None:
    """NCCL needs one GPU per rank: learner rank 0 and a vLLM worker on one GPU need another hand-off."""
    devices = [d for d in [learner_device, *(d for r in replicas for d in r["devices"])] if d is not None]
    if len(devices) != len(set(devices)):
        raise ValueError(
            "inference.weight_sync=collective over NCCL needs learner rank 0 and every vLLM worker on distinct "
            "GPUs, but some share one (learner and vLLM co-located on a GPU): use inference.weight_sync="
            "object_store there"
        )


def build_weight_group(
    learners: LearnerGroup, handle: Any, replicas: list[dict[str, Any]], backend: str, timeout_s: float
) -> str:
    """A new group: learner rank 0 hosts the rendezvous, the replicas' workers join concurrently (each
    leaves its old group first). Fails after `timeout_s` when a rank does not arrive."""
    check_distinct_devices(learners.weight_device_identity(backend), replicas)
    offsets = rank_offsets(replicas)
    world_size = 1 + sum(r["workers"] for r in replicas)
    spec = learners.open_weight_group(world_size, backend, timeout_s)
    learner_joined = learners.join_weight_group()
    handle.broadcast("join_weight_group", spec, offsets).results(timeout_s=DRIVER_TIMEOUTS * timeout_s)
    ray.get(learner_joined, timeout=DRIVER_TIMEOUTS * timeout_s)
    log.info("weight group %s: %s, %d ranks", spec["group_id"], backend, world_size)
    return spec["group_id"]


def broadcast_through_group(
    learners: LearnerGroup, handle: Any, group_id: str, version: int, timeout_s: float
) -> list[dict[str, Any]]:
    """Learner send and replica receive, started together (they meet inside each broadcast)."""
    sent = learners.send_weights()
    wait = DRIVER_TIMEOUTS * timeout_s
    results = handle.broadcast("receive_weights", group_id, version).results(timeout_s=wait)
    stats = ray.get(sent, timeout=wait)[0]
    return [
        {**r, "path": "collective", "bytes": stats["bytes"], "buckets": stats["buckets"]} for r in results
    ]


def ipc_sync(
    learners: LearnerGroup, handle: Any, version: int, backend: str, timeout_s: float
) -> list[dict[str, Any]]:
    """The update by handle: check every replica is beside learner rank 0, let rank 0 pack and export its
    weights for every vLLM worker, have every replica load them, then free rank 0's buffers (also on a
    failure)."""
    replicas = handle.broadcast("weight_group_status", backend).results(timeout_s=timeout_s)
    check_colocated(learners.weight_ipc_identity(backend), replicas)
    # One handle set per vLLM worker (CUDA IPC pairs one export with one consumer), numbered like the weight
    # group's ranks without the learner's rank 0: worker k of a replica uses set offsets[replica] + k.
    offsets = {r: rank - 1 for r, rank in rank_offsets(replicas).items()}
    try:
        payload = learners.share_weights(sum(r["workers"] for r in replicas), backend)
        wait = DRIVER_TIMEOUTS * timeout_s
        results = handle.broadcast("receive_shared_weights", payload, offsets, version).results(
            timeout_s=wait
        )
    finally:
        learners.release_shared_weights()
    buffers = len(payload["handles"][0]) if payload["handles"] else 0
    return [{**r, "path": "ipc", "bytes": payload["bytes"], "buffers": buffers} for r in results]


def check_colocated(learner: dict[str, Any], replicas: list[dict[str, Any]]) -> None:
    """The ipc hand-off maps memory of learner rank 0's machine: every replica must run on its Ray node and,
    when the buffers are on a GPU (`learner["device"]` is its UUID), every vLLM worker on that GPU."""
    for r in replicas:
        if r["node_id"] != learner["node_id"]:
            raise ValueError(
                f"inference.weight_sync=ipc needs every vLLM replica on the node of learner rank 0 "
                f"({learner['node_id']}), but replica {r['replica']} runs on node {r['node_id']}: use "
                "inference.weight_sync=collective or object_store across nodes"
            )
        if learner["device"] is not None and any(d != learner["device"] for d in r["devices"]):
            raise ValueError(
                f"inference.weight_sync=ipc on GPUs needs every vLLM worker on the GPU of learner rank 0 "
                f"({learner['device']}), but replica {r['replica']} uses {r['devices']}: use "
                "inference.weight_sync=collective when learner and vLLM have GPUs of their own"
            )


def close_weight_sync(learners: LearnerGroup, handle: Any, timeout_s: float = 60.0) -> None:
    """Leave the weight group on every side (best effort: a side that is gone already left it)."""
    try:
        learners.close_weight_group()
    except GROUP_FAILURES as e:
        log.warning("learner rank 0 could not leave its weight group: %s", e)
    try:
        handle.broadcast("close_weight_group").results(timeout_s=timeout_s, return_exceptions=True)
    except TimeoutError as e:
        log.warning("replicas did not leave the weight group in %.0f s: %s", timeout_s, e)
