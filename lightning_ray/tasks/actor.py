"""The TaskPool as a named Ray actor: a thin async wrapper that adds waiting, lease expiry and liveness pings.

All methods run on the actor's one event loop and call the plain `TaskPool` synchronously, so its state is
never touched concurrently. A background loop expires leases and pings registered worker handles every
`check_interval_s`; a worker whose ping raises `ActorDiedError` is reported dead and its leases go back to
the queue. A ping that is merely slow (a busy sync actor) proves nothing and is ignored: lease deadlines
cover hung workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from lightning_ray.tasks.dataset import Task, load_tasks
from lightning_ray.tasks.pool import Lease, RolloutResult, TaskPool

if TYPE_CHECKING:
    from lightning_ray.config import Config

log = logging.getLogger(__name__)

DEFAULT_POOL_NAME = "lightning_ray.task_pool"


class TaskPoolActor:
    """Use through `create_task_pool` / `get_task_pool`; every `TaskPool` method is here as a remote method."""

    def __init__(
        self,
        tasks: list[Task],
        *,
        check_interval_s: float = 1.0,
        ping_timeout_s: float = 10.0,
        **pool_kwargs: Any,
    ) -> None:
        self._pool = TaskPool(tasks, **pool_kwargs)
        self._check_interval_s = check_interval_s
        self._ping_timeout_s = ping_timeout_s
        self._changed: asyncio.Event | None = None
        self._watcher: asyncio.Task | None = None

    # ---- background work -------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._changed = asyncio.Event()
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def _notify(self) -> None:
        """Wake every `wait_batch`; they re-check their batch."""
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def _watch(self) -> None:
        while True:
            try:
                if self._pool.expire_leases():
                    self._notify()
                await self.check_workers()
            except Exception:  # the watcher must outlive any single bad round
                log.exception("task pool watcher round failed")
            await asyncio.sleep(self._check_interval_s)

    async def _is_dead(self, handle: Any) -> str | None:
        try:
            await asyncio.wait_for(handle.__ray_ready__.remote(), self._ping_timeout_s)
        except (TimeoutError, ActorUnavailableError):
            return None
        except RayActorError as e:  # ActorDiedError and older spellings of "this actor is gone"
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return None

    async def check_workers(self) -> list[str]:
        """Ping every registered worker handle now; report the dead ones. Returns their ids."""
        handles = self._pool.worker_handles()
        verdicts = await asyncio.gather(*(self._is_dead(h) for h in handles.values()))
        dead = []
        for worker_id, reason in zip(handles, verdicts, strict=True):
            if reason is not None:
                self._pool.report_worker_dead(worker_id, reason)
                dead.append(worker_id)
        if dead:
            self._notify()
        return dead

    # ---- the TaskPool API ------------------------------------------------------------------------------

    async def register_worker(self, worker_id: str, handle: Any = None) -> None:
        self._start()
        self._pool.register_worker(worker_id, handle)

    async def report_worker_dead(self, worker_id: str, reason: str = "reported dead") -> list[str]:
        self._start()
        held = self._pool.report_worker_dead(worker_id, reason)
        self._notify()
        return held

    async def start_batch(self, num_tasks: int, group_size: int | None = None) -> str:
        self._start()
        return self._pool.start_batch(num_tasks, group_size)

    async def lease(self, worker_id: str, max_n: int = 1) -> list[Lease]:
        self._start()
        return self._pool.lease(worker_id, max_n)

    async def renew(self, worker_id: str, leases: list[tuple[str, int]]) -> list[str]:
        self._start()
        return self._pool.renew(worker_id, leases)

    async def complete(self, rollout_id: str, attempt: int, status: str, **kwargs: Any) -> str:
        self._start()
        outcome = self._pool.complete(rollout_id, attempt, status, **kwargs)
        self._notify()
        return outcome

    async def batch_done(self, batch_id: str) -> bool:
        self._start()
        self._pool.expire_leases()
        return self._pool.batch_done(batch_id)

    async def wait_batch(self, batch_id: str, timeout_s: float | None = None) -> bool:
        """Wait until every rollout of the batch is final; False if `timeout_s` passed first."""
        self._start()
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while not self._pool.batch_done(batch_id):
            wait = (
                self._check_interval_s
                if deadline is None
                else min(self._check_interval_s, deadline - loop.time())
            )
            if wait <= 0:
                return False
            assert self._changed is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)
            self._pool.expire_leases()
        return True

    async def batch_results(self, batch_id: str) -> list[RolloutResult]:
        return self._pool.batch_results(batch_id)

    async def groups(self, batch_id: str) -> list[dict[str, Any]]:
        return self._pool.groups(batch_id)

    async def cancel_batch(self, batch_id: str, reason: str = "batch cancelled") -> int:
        n = self._pool.cancel_batch(batch_id, reason)
        self._notify()
        return n

    async def forget_batch(self, batch_id: str) -> None:
        self._pool.forget_batch(batch_id)

    async def stats(self, batch_id: str | None = None) -> dict[str, Any]:
        return self._pool.stats(batch_id)

    async def state(self) -> dict[str, Any]:
        return self._pool.state()

    async def load_state(self, state: dict[str, Any]) -> None:
        self._pool.load_state(state)

    async def num_tasks(self) -> int:
        return self._pool.num_tasks

    async def adopt(self, tables: dict[str, Any]) -> dict[str, ray.ObjectRef]:
        """Put a worker's finished tables in the object store as objects this actor owns, so they outlive the
        worker that made them (Ray frees an object when its owner dies)."""
        return {name: ray.put(table) for name, table in tables.items()}


def create_task_pool(
    tasks: list[Task] | str | Path,
    *,
    name: str = DEFAULT_POOL_NAME,
    num_cpus: float = 0.05,
    check_interval_s: float = 1.0,
    ping_timeout_s: float = 10.0,
    **pool_kwargs: Any,
) -> Any:
    """Start the named TaskPool actor and return its handle.

    The dataset is read here, in the caller, so a bad row fails with a plain DatasetError naming the file
    and line rather than an actor that never started. `pool_kwargs` go to `TaskPool` (group_size,
    max_attempts, lease_timeout_s, shuffle, seed).
    """
    if not isinstance(tasks, list):
        tasks = load_tasks(tasks)
    actor_cls = ray.remote(TaskPoolActor)
    return actor_cls.options(name=name, num_cpus=num_cpus, max_concurrency=1000).remote(
        tasks, check_interval_s=check_interval_s, ping_timeout_s=ping_timeout_s, **pool_kwargs
    )


def task_pool_from_config(cfg: Config, split: str = "train", name: str | None = None) -> Any:
    """The TaskPool of `cfg.data.<split>` with the run's group size, attempts and lease timeout.

    Validation pools (split="val") are not shuffled; use `start_batch(n, group_size=1)` for greedy eval.
    """
    from lightning_ray.config import resolve_path

    path = cfg.data.train if split == "train" else cfg.data.val
    if path is None:
        raise ValueError(f"data.{split} is not set in the config")
    base = Path(cfg.source).parent if cfg.source else Path.cwd()
    return create_task_pool(
        load_tasks(resolve_path(path, base)),
        name=name or f"{DEFAULT_POOL_NAME}.{split}",
        group_size=cfg.algorithm.group_size,
        max_attempts=cfg.rollout.max_attempts,
        lease_timeout_s=cfg.rollout.lease_timeout_s,
        shuffle=cfg.data.shuffle and split == "train",
        seed=cfg.data.seed,
    )


def get_task_pool(name: str = DEFAULT_POOL_NAME, namespace: str | None = None) -> Any:
    """The handle of a running TaskPool actor, from any process in the cluster."""
    return ray.get_actor(name, namespace=namespace)
