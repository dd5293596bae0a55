"""The TaskPool as a named Ray actor: a thin async wrapper that adds waiting, lease expiry and liveness pings.

All methods run on the actor's one event loop and call the plain `TaskPool` synchronously, so its state is
never touched concurrently. Most are the plain methods as they are (`_forward`); the actor adds waiting (an
idle worker's `lease(wait_s=...)`, `wait_batch` and `wait_groups` sleep on one change event, set whenever
rollouts are queued, requeued or finished) and owning a finished group's tables (`report_group`).

A background loop expires leases and pings registered worker handles every `check_interval_s`; a worker whose
ping raises `ActorDiedError` is reported dead and its leases go back to the queue. A ping that is merely slow
(a busy sync actor) proves nothing and is ignored: lease deadlines cover hung workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from lightning_ray.names import POOL_NAME as DEFAULT_POOL_NAME
from lightning_ray.tasks.dataset import Task, load_tasks
from lightning_ray.tasks.pool import TaskPool
from lightning_ray.tasks.records import Lease, RolloutReport

if TYPE_CHECKING:
    from lightning_ray.config import Config

log = logging.getLogger(__name__)


def _forward(method: Callable[..., Any], *, notify: bool = False) -> Callable[..., Any]:
    """`TaskPool.<method>` as a method of the actor (same name, signature and docstring, so Ray checks the
    arguments of `.remote(...)` against it). `notify`: the call can queue, requeue or finish rollouts, so
    whoever waits for a change (`lease(wait_s=...)`, `wait_batch`, `wait_groups`) looks again."""

    @functools.wraps(method)
    async def forward(self: TaskPoolActor, *args: Any, **kwargs: Any) -> Any:
        self._start()
        out = method(self._pool, *args, **kwargs)
        if notify:
            self._notify()
        return out

    return forward


class TaskPoolActor:
    """Use through `create_task_pool` / `get_task_pool`; the `TaskPool` API, as remote methods."""

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

    # ---- the TaskPool API, each call a plain call on the actor's loop ---------------------------------------

    register_worker = _forward(TaskPool.register_worker)
    report_worker_dead = _forward(TaskPool.report_worker_dead, notify=True)
    retire_worker = _forward(TaskPool.retire_worker, notify=True)  # its waiting lease call answers [] at once
    request_workers = _forward(TaskPool.request_workers)
    start_batch = _forward(TaskPool.start_batch, notify=True)
    open_batch = _forward(TaskPool.open_batch)
    add_groups = _forward(TaskPool.add_groups, notify=True)
    resume_group = _forward(TaskPool.resume_group, notify=True)
    close_batch = _forward(TaskPool.close_batch, notify=True)
    take_groups = _forward(TaskPool.take_groups)
    forget_groups = _forward(TaskPool.forget_groups)
    open_groups = _forward(TaskPool.open_groups)
    renew = _forward(TaskPool.renew)
    complete = _forward(TaskPool.complete, notify=True)
    batch_results = _forward(TaskPool.batch_results)
    groups = _forward(TaskPool.groups)
    cancel_batch = _forward(TaskPool.cancel_batch, notify=True)
    cut_groups = _forward(TaskPool.cut_groups, notify=True)
    forget_batch = _forward(TaskPool.forget_batch)
    stats = _forward(TaskPool.stats)
    state = _forward(TaskPool.state)
    load_state = _forward(TaskPool.load_state)
    rewind = _forward(TaskPool.rewind)
    num_tasks = _forward(TaskPool.num_tasks.fget)

    # ---- what only the actor can do: wait, and own objects -------------------------------------------------

    async def lease(
        self, worker_id: str, max_n: int = 1, wait_s: float = 0.0, batch_id: str | None = None
    ) -> list[Lease]:
        """`TaskPool.lease`; with `wait_s`, an empty queue is waited on for up to `wait_s` seconds, or until
        batch `batch_id` is done. An empty answer means: nothing came in time, the batch is done, or the worker
        retires (`retire_worker`)."""
        self._start()
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            leases = self._pool.lease(worker_id, max_n)
            if leases or self._pool.retiring(worker_id):
                return leases
            if batch_id is not None and self._pool.batch_done(batch_id):
                return leases
            if not await self._wait_for_change(deadline):
                return []

    async def batch_done(self, batch_id: str) -> bool:
        self._start()
        self._pool.expire_leases()
        return self._pool.batch_done(batch_id)

    async def wait_batch(self, batch_id: str, timeout_s: float | None = None) -> bool:
        """Wait until every rollout of the batch is final; False if `timeout_s` passed first."""
        self._start()
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        while not self._pool.batch_done(batch_id):
            if not await self._wait_for_change(deadline):
                return False
            self._pool.expire_leases()
        return True

    async def wait_groups(
        self, batch_id: str, max_n: int | None = None, timeout_s: float = 0.0
    ) -> list[dict[str, Any]]:
        """`TaskPool.take_groups`, after waiting up to `timeout_s` seconds (0: not at all) for a complete group.
        An empty answer means: none completed in time, or the batch is done and every group was taken."""
        self._start()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            taken = self._pool.take_groups(batch_id, max_n)
            if taken or self._pool.batch_done(batch_id) or not await self._wait_for_change(deadline):
                return taken

    async def report_group(self, tables: dict[str, Any], reports: list[RolloutReport]) -> list[str]:
        """A worker's finished group in one call: its tables (`lightning_ray.data.schema.group_tables`) become
        objects this actor owns, so they outlive the worker that made them (Ray frees an object when its owner
        dies), and every report is completed with them as its result. Returns `complete`'s answer for each."""
        self._start()
        refs = {name: ray.put(table) for name, table in tables.items()}
        answers = self._pool.complete_all(reports, result=refs)
        self._notify()
        return answers

    # ---- background work -------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._changed = asyncio.Event()
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def _notify(self) -> None:
        """Wake every waiter; they look again."""
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def _wait_for_change(self, deadline: float | None) -> bool:
        """Wait for the next `_notify`, at most until `deadline` (loop time; None: no limit) and at most one
        check interval, since a lease that `lease`/`renew` expired in passing notifies nobody. False once the
        deadline has passed."""
        wait = self._check_interval_s
        if deadline is not None:
            wait = min(wait, deadline - asyncio.get_running_loop().time())
        if wait <= 0:
            return False
        assert self._changed is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), wait)
        return True

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
    from lightning_ray.names import task_pool

    path = cfg.data.train if split == "train" else cfg.data.val
    if path is None:
        raise ValueError(f"data.{split} is not set in the config")
    base = Path(cfg.source).parent if cfg.source else Path.cwd()
    return create_task_pool(
        load_tasks(resolve_path(path, base)),
        name=name or task_pool(cfg, split),
        group_size=cfg.algorithm.group_size,
        max_attempts=cfg.rollout.max_attempts,
        lease_timeout_s=cfg.rollout.lease_timeout_s,
        shuffle=cfg.data.shuffle and split == "train",
        seed=cfg.data.seed,
    )


def get_task_pool(name: str = DEFAULT_POOL_NAME, namespace: str | None = None) -> Any:
    """The handle of a running TaskPool actor, from any process in the cluster."""
    return ray.get_actor(name, namespace=namespace)
