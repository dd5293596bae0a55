"""`lightning-ray serve CONFIG --learn`: serve the policy to real clients and train on their rewarded rollouts.

The same GRPO loop as `lightning-ray train` (`lightning_ray.loop.run`: the rollout stream, the learner step,
weight sync to the replicas, checkpoints, metrics.jsonl, summary.json and the ledger), over a live pool
(`lightning_ray.live.pool`) that the live gateway fills from traffic instead of a dataset, with no rollout
workers: the gateway is the pool's only runner. It runs `trainer.steps` steps, or until Ctrl-C. With
`inference.canary`, each step's weights go to the canary replicas first and the loop waits for the verdict
(`lightning_ray.live.promotion`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning_ray.config import Config, ConfigError
from lightning_ray.gateway.server import Gateway, start_gateway_thread
from lightning_ray.gateway.standalone import print_learning
from lightning_ray.live.desk import LiveDesk
from lightning_ray.live.pool import create_live_pool
from lightning_ray.live.promotion import CanaryRelease
from lightning_ray.live.routes import live_routes
from lightning_ray.live.scorer import load_scorer


@dataclass
class GatewayOnly:
    """The rollout workers of a live run, for the loop and the stream: none (the live gateway runs every
    rollout of the pool)."""

    handles: list[Any] = field(default_factory=list)
    restarts: int = 0
    deaths: list[str] = field(default_factory=list)
    added: int = 0
    retired: int = 0

    def serve(self, batch_id: str, pool: Any, sampling: dict[str, Any] | None = None) -> None:
        pass

    def check(self) -> list[int]:
        return []

    def finished(self, batch_id: str, timeout_s: float = 0.0) -> bool:
        return True

    def release(self, batch_id: str) -> dict[int, Any]:
        return {}

    def metrics(self) -> dict[str, int]:
        return {"rollout/workers": 0}

    def llm_calls(self) -> int:
        """None recorded by workers: the watchdog sees live calls as rollouts ending in the live pool."""
        return 0


def live_config(cfg: Config) -> Config:
    """The run's config: groups of `live.group_size`; refused when grouped rollouts could never be rewarded."""
    if cfg.algorithm.name != "grpo":
        raise ConfigError(f"algorithm.name: {cfg.algorithm.name}; serve --learn trains grpo")
    if cfg.live.group_fraction > 0 and not cfg.live.has_scorer:
        raise ConfigError(
            f"live.group_fraction={cfg.live.group_fraction:g} needs live.scorer or live.judge_url to reward "
            "the extra samples (or set live.group_fraction=0 to only serve and record)"
        )
    out = cfg.model_copy(deep=True)
    out.algorithm.group_size = cfg.live.group_size
    out.source = cfg.source
    return out


def learn(cfg: Config, ready: Callable[[Gateway], None] = print_learning) -> list[dict[str, Any]]:
    """Serve and train until `trainer.steps` are done; returns the metrics rows. `ready(gateway)` runs once the
    gateway listens (the CLI prints its URL)."""
    from lightning_ray.loop import run, start_learners
    from lightning_ray.monitor.run_log import RunLog
    from lightning_ray.rollouts.stack import deploy_policies, stop_rollout_stack
    from lightning_ray.runtime import init_ray, run_directory

    cfg = live_config(cfg)
    scorer = load_scorer(cfg.live)  # a wrong module fails before Ray starts
    init_ray(cfg)
    run_dir = run_directory(cfg, "live")
    inference = deploy_policies(cfg)
    pool = learners = gateway = None
    try:
        pool = create_live_pool(cfg)
        learners = start_learners(cfg)
        log = RunLog(cfg, run_dir)
        desk = LiveDesk(cfg, pool, run_dir, scorer)
        routes = live_routes(desk, cfg.gateway.max_request_bytes)
        gateway = start_gateway_thread(cfg, handle=inference, manage_rollouts=True, add_routes=routes)
        ready(gateway)
        canary = cfg.inference.canary is not None
        with (
            CanaryRelease(cfg, learners, inference, run_dir)
            if canary
            else contextlib.nullcontext() as release
        ):
            run(cfg, None, run_dir, inference, pool, GatewayOnly(), None, learners, log, release=release)  # type: ignore[arg-type]
    finally:
        if gateway is not None:
            gateway.stop_sync()
        if learners is not None:
            learners.shutdown()
        stop_rollout_stack(cfg, None, [pool])
    return log.rows
