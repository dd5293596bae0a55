"""`lightning-ray rollout CONFIG`: the dataset (or `--limit N` tasks) through the agent once, summarised."""

from __future__ import annotations

import json
from typing import Any

import ray
from ray import serve

from lightning_ray.config import Config
from lightning_ray.data.trajectories import write_parquet
from lightning_ray.inference.server import APP_NAME, FROZEN_APP_NAME, deploy_inference
from lightning_ray.models import resolve_model
from lightning_ray.monitor.metrics import record_batch_metrics
from lightning_ray.rollouts.collect import collect_batch
from lightning_ray.rollouts.worker import start_rollout_workers
from lightning_ray.runtime import init_ray, new_run_dir
from lightning_ray.tasks.actor import task_pool_from_config


def deploy_policies(cfg: Config) -> Any:
    """The live policy's inference app, and with `rollout.frozen_agents` a frozen snapshot of it: the same model
    at its starting weights under `FROZEN_APP_NAME`, which weight broadcasts (to the live handle) never reach.
    Returns the live handle; gateways find the frozen app by name."""
    model_dir = resolve_model(cfg.model.path)
    live = deploy_inference(model_dir, cfg.model, cfg.inference)
    if cfg.rollout.frozen_agents:
        deploy_inference(model_dir, cfg.model, cfg.inference, app_name=FROZEN_APP_NAME)
    return live


def start_rollout_stack(cfg: Config, split: str = "train") -> tuple[Any, Any, list[Any]]:
    """Inference replicas (live, and frozen if configured), the split's TaskPool and the rollout workers, in that
    order; returns the live inference handle, the pool and the workers."""
    inference = deploy_policies(cfg)
    pool = task_pool_from_config(cfg, split=split)
    workers = start_rollout_workers(cfg, pool)
    return inference, pool, workers


def stop_rollout_stack(workers: list[Any], pools: list[Any]) -> None:
    """Stop the workers (agent teardown, gateway) and the pools; the inference apps (live and frozen, when
    deployed) go with `serve.delete`."""
    ray.get([w.stop.remote() for w in workers])
    for actor in [*workers, *(p for p in pools if p is not None)]:
        ray.kill(actor)
    for app in (APP_NAME, FROZEN_APP_NAME):
        serve.delete(app)  # a no-op for an app that is not deployed


def run_rollout(cfg: Config, limit: int | None = None, split: str = "train") -> dict[str, Any]:
    init_ray(cfg)
    run_dir = new_run_dir(cfg, "rollout")
    _, pool, workers = start_rollout_stack(cfg, split)
    try:
        num_tasks = limit or ray.get(pool.num_tasks.remote())
        batch = collect_batch(pool, workers, num_tasks, desc=f"rollout {split}")
    finally:
        stop_rollout_stack(workers, [pool])
    record_batch_metrics(batch.summary, run=cfg.trainer.name)
    write_parquet(batch.transitions, run_dir, "rollout-transitions")
    write_parquet(batch.rollouts, run_dir, "rollout-rollouts")
    summary = {
        **batch.summary.to_dict(),
        "tasks": num_tasks,
        "llm_calls": batch.transitions.num_rows,
        "seconds": round(batch.seconds, 2),
        "rollouts_per_s": round(batch.summary.num_rollouts / batch.seconds, 3),
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    s = batch.summary
    reward = "n/a" if s.reward_mean is None else f"{s.reward_mean:.3f} ± {s.reward_std:.3f}"
    print(
        f"{s.num_rollouts} rollouts of {num_tasks} tasks in {batch.seconds:.1f}s: success {s.success_rate:.1%}, "
        f"reward {reward}, {batch.transitions.num_rows} LLM calls"
    )
    if s.num_succeeded < s.num_rollouts:
        print(s.diagnosis())
    print(f"trajectories and summary.json in {run_dir}")
    return summary
