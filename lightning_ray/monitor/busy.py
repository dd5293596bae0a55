"""How long each part of the pipeline was busy during a step: the numbers that show whether it overlaps.

Inference replicas and rollout workers keep running totals of the seconds they had work in flight
(`busy_seconds`); a step's busy fraction is the growth of that total over the step's wall time, averaged over
the replicas (workers). The learner and the weight sync are timed by the driver itself.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import ray

READ_TIMEOUT_S = 10.0


class BusyTime:
    """Seconds during which at least one of the things it times was running: a running total, kept by an
    inference replica (requests) or a rollout worker (rollouts)."""

    def __init__(self) -> None:
        self._running = 0
        self._total_s, self._since = 0.0, 0.0

    def start(self) -> None:
        if self._running == 0:
            self._since = time.perf_counter()
        self._running += 1

    def stop(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._total_s += time.perf_counter() - self._since

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self.start()
        try:
            yield
        finally:
            self.stop()

    def seconds(self) -> float:
        return self._total_s + (time.perf_counter() - self._since if self._running else 0.0)


class BusyClock:
    def __init__(self, inference: Any, workers: list[Any]):
        self.inference, self.workers = inference, workers
        self.last, self.t = self.read(), time.perf_counter()

    def read(self) -> dict[str, float]:
        """Mean running totals over the replicas and the live workers (a dead worker is left out)."""
        from lightning_ray.inference.server import InferenceServer

        replicas = self.inference.broadcast(InferenceServer.busy_seconds.__name__).results(
            timeout_s=READ_TIMEOUT_S, return_exceptions=True
        )
        refs = [w.busy_seconds.remote() for w in self.workers]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=READ_TIMEOUT_S)
        agents = []
        for ref in done:
            try:
                agents.append(ray.get(ref))
            except ray.exceptions.RayError:
                continue
        return {"inference": _mean(replicas), "agents": _mean(agents)}

    def fractions(self) -> dict[str, float]:
        """Busy fraction of inference and agents since the last call."""
        now, t = self.read(), time.perf_counter()
        wall = max(t - self.t, 1e-9)
        out = {f"time/{part}_busy_frac": max(0.0, now[part] - self.last[part]) / wall for part in now}
        self.last, self.t = now, t
        return out


def _mean(values: list[Any]) -> float:
    numbers = [v for v in values if isinstance(v, int | float)]
    return sum(numbers) / len(numbers) if numbers else 0.0
