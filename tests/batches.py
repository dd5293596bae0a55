"""Run a rollout batch through real rollout workers and stop everything it started."""

from __future__ import annotations

import ray

from lightning_ray.config import Config
from lightning_ray.rollouts.collect import Batch, collect_batch
from lightning_ray.rollouts.supervisor import RolloutWorkers
from lightning_ray.tasks.actor import task_pool_from_config


def run_batch(cfg: Config, name: str, num_tasks: int) -> Batch:
    """`num_tasks` GRPO groups of `cfg`'s agent through its own task pool and workers (named after `name`)."""
    pool = task_pool_from_config(cfg, name=f"pool-{name}")
    workers = RolloutWorkers(cfg, pool, prefix=name)
    try:
        return collect_batch(pool, workers, num_tasks, progress=False)
    finally:
        workers.stop()
        ray.kill(pool)
