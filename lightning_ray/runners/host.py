"""Where a train run's remote runners connect: a gateway of its own, in the driver, with the task API.

Each rollout worker's gateway is a loopback sidecar of that worker, and `lightning-ray serve` has no task pool;
so a train run with `gateway.runners.enabled` starts one more gateway, on `gateway.runners.host`/`port`, in front
of the same inference app and the run's train pool. Rollouts leased through it are recorded there (under their
lease id) and reported to the pool like any worker's. It runs on an event loop in a thread of the driver, so it
lives exactly as long as the run; its URL is printed and written to RUN_DIR/runners.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_ray.config import Config
from lightning_ray.gateway.server import Gateway, start_gateway_thread
from lightning_ray.runners.routes import task_routes

URL_FILE = "runners.json"


def start_runner_gateway(cfg: Config, inference: Any, pool: Any, run_dir: Path) -> Gateway:
    """The run's runners gateway (stop it with `stop_sync()`); says where it is and how to join."""
    bound = cfg.model_copy(deep=True)
    bound.gateway.host, bound.gateway.port = cfg.gateway.runners.host, cfg.gateway.runners.port
    gateway = start_gateway_thread(bound, handle=inference, add_routes=task_routes(cfg, pool))
    (run_dir / URL_FILE).write_text(json.dumps({"url": gateway.url, "agent": cfg.rollout.agent}) + "\n")
    token = " --token $TOKEN" if gateway.auth_token else ""
    print(
        f"remote runners: lightning-ray runner {gateway.url} --agent {cfg.rollout.agent}{token}", flush=True
    )
    return gateway
