"""How long each part of the pipeline was busy during a step: the numbers that show whether it overlaps.

Inference replicas and rollout workers keep running totals of the seconds they had work in flight
(`load_totals`, `busy_seconds`); a step's busy fraction is the growth of that total over the step's wall time,
averaged over the replicas (workers). The learner and the weight sync are timed by the driver itself. The
replicas also count their requests' prompt tokens and how many their prefix caches held: with K >= 1 a weight
update empties the caches while conversations are in flight, and their next calls compute their whole
context again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
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
    """Busy fractions over the time between two reads. `workers` returns the serving rollout workers (an elastic
    run's change); each worker's growth counts only from its first read, so a worker that joins or leaves
    moves no average."""

    def __init__(self, inference: Any, workers: Callable[[], list[Any]]):
        self.inference, self.workers = inference, workers
        self.last, self.t = self.read(), time.perf_counter()

    def read(self) -> dict[str, Any]:
        """The replicas' running totals (busy seconds: their mean; prompt tokens: their sum), and each live
        worker's busy seconds by actor id (a dead worker is left out)."""
        from lightning_ray.inference.server import InferenceServer

        answers = self.inference.broadcast(InferenceServer.load_totals.__name__).results(
            timeout_s=READ_TIMEOUT_S, return_exceptions=True
        )
        replicas = [a for a in answers if isinstance(a, dict)]
        workers = {w._actor_id.hex(): w.busy_seconds.remote() for w in self.workers()}
        done, _ = ray.wait(list(workers.values()), num_returns=len(workers), timeout=READ_TIMEOUT_S)
        agents = {}
        for actor, ref in workers.items():
            try:
                agents[actor] = ray.get(ref, timeout=0) if ref in done else None
            except ray.exceptions.RayError:
                continue
        return {
            "inference": _mean([r["busy_s"] for r in replicas]),
            "prompt_tokens": sum(r["prompt_tokens"] for r in replicas),
            "cached_prompt_tokens": sum(r["cached_prompt_tokens"] for r in replicas),
            "agents": {k: v for k, v in agents.items() if v is not None},
        }

    def fractions(self) -> dict[str, float]:
        """Busy fraction of inference and agents since the last call, and the prompt tokens the replicas computed
        (those their prefix caches did not have) with the share they had (left out when no prompt came)."""
        now, t = self.read(), time.perf_counter()
        wall = max(t - self.t, 1e-9)
        grown = [now["agents"][k] - v for k, v in self.last["agents"].items() if k in now["agents"]]
        prompt = max(0, now["prompt_tokens"] - self.last["prompt_tokens"])  # a restarted replica starts at 0
        cached = min(prompt, max(0, now["cached_prompt_tokens"] - self.last["cached_prompt_tokens"]))
        out = {
            "time/inference_busy_frac": max(0.0, now["inference"] - self.last["inference"]) / wall,
            "time/agents_busy_frac": max(0.0, _mean(grown)) / wall,
            "inference/prompt_tokens_computed": prompt - cached,
        }
        if prompt:
            out["inference/prefix_cache_hit_frac"] = cached / prompt
        self.last, self.t = now, t
        return out


def _mean(values: list[Any]) -> float:
    numbers = [v for v in values if isinstance(v, int | float)]
    return sum(numbers) / len(numbers) if numbers else 0.0
