"""`lightning-ray serve`: the gateway on its own, with routes to open, read and close rollouts over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from typing import Any

from lightning_ray.agent.urls import rollout_url
from lightning_ray.config import Config
from lightning_ray.gateway.server import Gateway, start_gateway


def print_ready(gateway: Gateway) -> None:
    print(describe(gateway), flush=True)


async def serve_gateway(
    config: Config, *, handle: Any | None = None, ready: Callable[[Gateway], None] = print_ready
) -> None:
    """Standalone gateway for `lightning-ray serve`: with the rollout management routes, until cancelled or
    SIGINT/SIGTERM. The inference service must already be deployed. `ready(gateway)` runs once it listens."""
    gateway = await start_gateway(config, handle=handle, manage_rollouts=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError):  # not the main thread: the caller owns signals
            loop.add_signal_handler(sig, stop.set)
    try:
        ready(gateway)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        await gateway.stop()


def print_learning(gateway: Gateway) -> None:
    print(describe(gateway, learn=True), flush=True)


def describe(gateway: Gateway, learn: bool = False) -> str:
    """What `lightning-ray serve` prints: the URL and how to use it (with `--learn`, how to reward)."""
    auth = ' -H "Authorization: Bearer $TOKEN"' if gateway.auth_token else ""
    reward = (
        f"\n  reward it:        curl -X POST{auth} {gateway.url}/rollouts/ROLLOUT_ID/reward -d '{{\"value\": 1}}'"
        if learn
        else ""
    )
    return (
        f"gateway: {gateway.url} (model {gateway.served_model})\n"
        f"  open a rollout:   curl -X POST{auth} {gateway.url}/rollouts   -> {{rollout_id, base_url}}\n"
        f"  OpenAI base URL:  {rollout_url(gateway.url, 'ROLLOUT_ID')}\n"
        f"  its transitions:  curl{auth} {gateway.url}/rollouts/ROLLOUT_ID   (DELETE closes it)"
        f"{reward}"
    )
