"""The names a run gives what it starts on a shared Ray cluster, so that two runs side by side do not collide:
its Serve apps (and with them the weight registry actors, `weights.registry.registry_name`), its task pools and
its rollout workers. Gateways bind port 0 (a free port) unless `gateway.port` says otherwise.

`train` and `rollout` set `ray.run_id` (`assign_run_id`: the run directory's name and a random part, as two
run directories under different roots may share a name) unless the config sets it;
every part reads its names from the config it is given, so the rollout workers' gateways find the run's own
apps. Without a run id (a library caller, the tests' shared deployment) the names are the fixed ones below.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from lightning_ray.config import Config
from lightning_ray.inference.server import APP_NAME, FROZEN_APP_NAME

POOL_NAME = "lightning_ray.task_pool"
WORKER_PREFIX = "rollout-worker"


def assign_run_id(cfg: Config, run_dir: Path) -> None:
    """Give the run an id of its own, `<trainer.name>.<run directory name>.<6 hex digits>`, unless it has one."""
    if cfg.ray.run_id is None:
        cfg.ray.run_id = f"{cfg.trainer.name}.{run_dir.name}.{secrets.token_hex(3)}"


def _scoped(name: str, cfg: Config) -> str:
    return f"{name}.{cfg.ray.run_id}" if cfg.ray.run_id else name


def inference_app(cfg: Config) -> str:
    """The Serve app of the live, trained policy."""
    return _scoped(APP_NAME, cfg)


def frozen_app(cfg: Config) -> str:
    """The Serve app of the frozen starting policy (`rollout.frozen_agents`)."""
    return _scoped(FROZEN_APP_NAME, cfg)


def task_pool(cfg: Config, split: str) -> str:
    return _scoped(f"{POOL_NAME}.{split}", cfg)


def worker_prefix(cfg: Config) -> str:
    """Rollout worker `i` is the named actor `<prefix>-<i>`."""
    return _scoped(WORKER_PREFIX, cfg)
