"""The run's rollout workers, kept alive: a worker that dies is replaced and the replacement serves its batches.

A worker whose agents left too many threads hung stops taking work (`HungAgentThreads`) and is replaced too.
The task pool already takes a dead worker's leases back (its liveness pings, `TaskPoolActor.check_workers`),
so the rollouts it ran go to the others. What the pool cannot do is start a worker: `RolloutWorkers.check`
notices a `work` call that ended with the actor's death, tells every pool it served (so its leases return at
once, not after a ping), starts a replacement through `start_rollout_workers` and puts it to work on every batch
still being served. After `rollout.max_worker_restarts` replacements the run stops (`WorkersExhausted`):
an agent that kills its process every time must not loop forever.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from lightning_ray.config import Config
from lightning_ray.faults import TaskPoolLost, WorkersExhausted, first_line, get
from lightning_ray.names import worker_prefix
from lightning_ray.rollouts.worker import HungAgentThreads, start_rollout_workers

log = logging.getLogger(__name__)
START_TIMEOUT_S = 300.0  # a replacement's gateway and agent setup


@dataclass
class Serving:
    """One batch the workers serve: the pool it lives in, its sampling, and each worker's `work` call."""

    pool: Any
    sampling: dict[str, Any] | None
    calls: dict[int, ray.ObjectRef] = field(default_factory=dict)  # worker index -> work() ref


class RolloutWorkers:
    """`rollout.num_workers` RolloutWorker actors; `handles` always holds the live ones, by index."""

    def __init__(self, cfg: Config, pool: Any, prefix: str | None = None):
        prefix = prefix or worker_prefix(cfg)  # the run's own names (`lightning_ray.names`)
        self.cfg, self.pool, self.prefix = cfg, pool, prefix
        self.handles: list[Any] = start_rollout_workers(cfg, pool, prefix=prefix)
        self.ids: list[str] = get(
            [w.ping.remote() for w in self.handles], "rollout worker ping", START_TIMEOUT_S
        )
        self.serving: dict[str, Serving] = {}
        self.restarts = 0
        self.deaths: list[str] = []  # "worker i: cause", in order

    def serve(self, batch_id: str, pool: Any, sampling: dict[str, Any] | None = None) -> None:
        """Every worker leases and runs the batch's rollouts until it is done."""
        serving = Serving(pool, sampling)
        for i, worker in enumerate(self.handles):
            serving.calls[i] = worker.work.remote(batch_id, pool, sampling)
        self.serving[batch_id] = serving

    def finished(self, batch_id: str, timeout_s: float = 0.0) -> bool:
        """Whether every worker's `work` on the batch returned (replacing the workers that died meanwhile)."""
        calls = list(self.serving[batch_id].calls.values())
        ray.wait(calls, num_returns=len(calls), timeout=timeout_s)
        self.check()
        calls = list(self.serving[batch_id].calls.values())
        done, _ = ray.wait(calls, num_returns=len(calls), timeout=0)
        return len(done) == len(calls)

    def release(self, batch_id: str) -> dict[int, Any]:
        """Forget a finished batch; returns what each worker's `work` returned."""
        serving = self.serving.pop(batch_id)
        return {i: ray.get(ref) for i, ref in serving.calls.items()}

    def check(self) -> list[int]:
        """Replace every worker whose `work` call ended with its death, or with `HungAgentThreads` (agent
        threads that will not stop are only freed with the process); re-raise any other crash of a worker.
        Returns the indices replaced."""
        dead: dict[int, str] = {}
        for serving in self.serving.values():
            calls = list(serving.calls.items())
            done, _ = ray.wait([ref for _, ref in calls], num_returns=len(calls), timeout=0)
            done_set = set(done)
            for i, ref in calls:
                if ref not in done_set or i in dead:
                    continue
                try:
                    ray.get(ref)
                except RayTaskError as e:
                    if isinstance(e.cause, HungAgentThreads):  # it stopped taking work: replace it
                        dead[i] = first_line(e.cause)
                        continue
                    if isinstance(e, RayActorError):  # the worker is alive; an actor it called died
                        get(serving.pool.__ray_ready__.remote(), "task pool", START_TIMEOUT_S, TaskPoolLost)
                    raise
                except RayActorError as e:
                    dead[i] = first_line(e)
        for i, cause in dead.items():
            self._replace(i, cause)
        return list(dead)

    def _replace(self, index: int, cause: str) -> None:
        self.deaths.append(f"worker {index}: {cause}")
        if self.restarts >= self.cfg.rollout.max_worker_restarts:
            raise WorkersExhausted(
                f"{len(self.deaths)} rollout workers died, rollout.max_worker_restarts="
                f"{self.cfg.rollout.max_worker_restarts} replacements used up: {'; '.join(self.deaths)}"
            )
        self.restarts += 1
        log.warning("rollout worker %d died (%s); starting replacement %d", index, cause, self.restarts)
        pools = {id(s.pool): s.pool for s in self.serving.values()} | {id(self.pool): self.pool}
        get(
            [p.report_worker_dead.remote(self.ids[index], cause) for p in pools.values()],
            "task pool report_worker_dead",
            self.cfg.trainer.stall_timeout_s,
        )
        ray.kill(self.handles[index])
        one = self.cfg.model_copy(update={"rollout": self.cfg.rollout.model_copy(update={"num_workers": 1})})
        (new,) = start_rollout_workers(one, self.pool, prefix=f"{self.prefix}-{index}.r{self.restarts}")
        self.handles[index] = new
        self.ids[index] = get(new.ping.remote(), "rollout worker ping", START_TIMEOUT_S)
        for batch_id, serving in self.serving.items():
            serving.calls[index] = new.work.remote(batch_id, serving.pool, serving.sampling)

    def stop(self) -> None:
        """Stop every worker: agent teardown and gateway, bounded; the dead ones are only logged."""
        from lightning_ray.rollouts.stack import stop_workers

        stop_workers(self.handles)
