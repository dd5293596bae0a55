"""The task pool of a live run: groups come from traffic, not from a dataset.

The training loop's `RolloutStream` drives it exactly like a dataset pool (`open_batch`, `wait_groups`,
`forget_groups`, `close_batch`, the ledger and the accounting of `TaskPool`); what differs is where groups come
from. `add_groups` starts none (the loop's admission has nothing to draw), and the live gateway starts one per
grouped live rollout with `start_live_group`, leasing its rollouts at once as the run's only runner. Leases,
reports and the one final state of every rollout are `TaskPool`'s own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

from lightning_ray.config import Config
from lightning_ray.names import task_pool
from lightning_ray.tasks.actor import TaskPoolActor, _forward
from lightning_ray.tasks.dataset import Task
from lightning_ray.tasks.pool import TaskPool
from lightning_ray.tasks.records import Lease

LIVE_RUNNER = "live-gateway"  # the worker id the live gateway leases under
NO_TASK = Task("live", {})  # TaskPool needs a dataset; a live pool never draws from it


class LivePool(TaskPool):
    def __init__(self, **pool_kwargs: Any) -> None:
        super().__init__([NO_TASK], shuffle=False, **pool_kwargs)
        self._live_batch: str | None = None
        self.register_worker(LIVE_RUNNER)

    def open_batch(self, group_size: int | None = None) -> str:
        """The stream's batch; live groups join the latest one opened."""
        self._live_batch = super().open_batch(group_size)
        return self._live_batch

    def add_groups(self, batch_id: str, n: int, task_ids: Sequence[str] = ()) -> list[str]:
        """Nothing to draw: live groups start with traffic (`start_live_group`)."""
        self._batch(batch_id)
        return []

    def close_batch(self, batch_id: str, reason: str = "batch closed") -> int:
        """The run's end: every rollout not final is abandoned, those still waiting for a reward too (nothing
        but the gateway runs them, and it is stopping)."""
        return self.cancel_batch(batch_id, reason)

    def start_live_group(self, task: Task) -> list[Lease]:
        """Queue one group of `task` in the open batch and lease all its rollouts to the live gateway, in index
        order. None open (before the loop starts, after it ends): no group, `[]`."""
        batch = self._batches.get(self._live_batch or "")
        if batch is None or not batch.open:
            return []
        self._tasks[task.task_id] = task
        group_id = self._add_groups(batch, [task])[0]
        leases = self.lease(LIVE_RUNNER, batch.group_size)
        assert all(lease.group_id == group_id for lease in leases), "only the live gateway leases here"
        return sorted(leases, key=lambda lease: lease.index_in_group)


class LivePoolActor(TaskPoolActor):
    """`TaskPoolActor` over a `LivePool`."""

    def __init__(self, *, check_interval_s: float = 1.0, **pool_kwargs: Any) -> None:
        super().__init__([NO_TASK], check_interval_s=check_interval_s, **pool_kwargs)
        self._pool = LivePool(**pool_kwargs)

    open_batch = _forward(LivePool.open_batch)
    add_groups = _forward(LivePool.add_groups)
    close_batch = _forward(LivePool.close_batch, notify=True)
    start_live_group = _forward(LivePool.start_live_group, notify=True)


def create_live_pool(cfg: Config) -> Any:
    """The run's live pool actor. Its leases outlast `live.reward_deadline_s`: the gateway ends every live
    rollout itself, by its reward or at the deadline, and a lease that expired first would run it again."""
    actor = ray.remote(LivePoolActor).options(
        name=task_pool(cfg, "live"), num_cpus=0.05, max_concurrency=1000
    )
    return actor.remote(
        group_size=cfg.live.group_size,
        max_attempts=1,
        lease_timeout_s=cfg.live.reward_deadline_s + 120.0,
    )
