"""The rollout stack: inference replicas (live, and a frozen snapshot if configured), a TaskPool and the rollout
workers, started in that order and stopped together. `lightning-ray train`, `rollout` and `serve` build on it."""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray import serve

from lightning_ray.config import Config
from lightning_ray.faults import first_line
from lightning_ray.inference.server import deploy_inference
from lightning_ray.models import resolve_model
from lightning_ray.names import frozen_app, inference_app
from lightning_ray.rollouts.supervisor import RolloutWorkers
from lightning_ray.tasks.actor import task_pool_from_config

STOP_TIMEOUT_S = 60.0  # an agent's teardown and the gateway's shutdown
log = logging.getLogger(__name__)


def deploy_policies(cfg: Config) -> Any:
    """The live policy's inference app, and with `rollout.frozen_agents` a frozen snapshot of it: the same model
    at its starting weights under `names.frozen_app`, which weight broadcasts (to the live handle) never reach.
    Returns the live handle; gateways find the frozen app by name."""
    model_dir = resolve_model(cfg.model.path)
    live = deploy_inference(model_dir, cfg.model, cfg.inference, app_name=inference_app(cfg))
    if cfg.rollout.frozen_agents:
        deploy_inference(model_dir, cfg.model, cfg.inference, app_name=frozen_app(cfg))
    return live


def start_rollout_stack(cfg: Config, split: str = "train") -> tuple[Any, Any, RolloutWorkers]:
    """Inference replicas (live, and frozen if configured), the split's TaskPool and the rollout workers, in that
    order; returns the live inference handle, the pool and the workers."""
    inference = deploy_policies(cfg)
    pool = task_pool_from_config(cfg, split=split)
    try:
        return inference, pool, RolloutWorkers(cfg, pool)
    except BaseException:
        ray.kill(pool)  # a named actor: it must not outlive a failed start
        raise


def stop_workers(workers: list[Any]) -> None:
    """Stop the workers (agent teardown, gateway) and kill them. A worker that already died, or does not stop
    within `STOP_TIMEOUT_S`, is only logged: there is nothing more to stop."""
    stops = [w.stop.remote() for w in workers]
    ray.wait(stops, num_returns=len(stops), timeout=STOP_TIMEOUT_S)
    for worker, stopped in zip(workers, stops, strict=True):
        try:
            ray.get(stopped, timeout=0)
        except (ray.exceptions.RayError, TimeoutError) as e:
            log.warning("rollout worker %s did not stop cleanly: %s", worker, first_line(e))
        ray.kill(worker)


def stop_rollout_stack(cfg: Config, workers: RolloutWorkers | None, pools: list[Any]) -> None:
    """Stop the workers and the pools; the run's inference apps (live and frozen, when deployed) go with
    `serve.delete`."""
    if workers is not None:
        workers.stop()
    for pool in pools:
        if pool is not None:
            ray.kill(pool)
    for app in (inference_app(cfg), frozen_app(cfg)):
        serve.delete(app)  # a no-op for an app that is not deployed
