"""The task pool: dataset loading, GRPO groups, leases with deadlines, retries, one final state per rollout.

`TaskPool` is the plain, Ray-free logic (unit-testable); `create_task_pool` starts it as a named Ray actor.
"""

from lightning_ray.tasks.dataset import DatasetError, Task, load_tasks
from lightning_ray.tasks.pool import TaskPool
from lightning_ray.tasks.records import (
    FINAL_STATUSES,
    Lease,
    RolloutRecord,
    RolloutReport,
    RolloutStatus,
    WorkerDeadError,
)

__all__ = [
    "FINAL_STATUSES",
    "DatasetError",
    "Lease",
    "RolloutRecord",
    "RolloutReport",
    "RolloutStatus",
    "Task",
    "TaskPool",
    "WorkerDeadError",
    "create_task_pool",
    "get_task_pool",
    "load_tasks",
    "task_pool_from_config",
]


def __getattr__(name: str):
    # The actor module imports Ray; load it only when asked so the plain pool stays light.
    if name in (
        "create_task_pool",
        "get_task_pool",
        "task_pool_from_config",
        "TaskPoolActor",
        "DEFAULT_POOL_NAME",
    ):
        from lightning_ray.tasks import actor

        return getattr(actor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
