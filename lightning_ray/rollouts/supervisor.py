"""The run's rollout workers, kept alive and, in an elastic run, scaled: a worker that dies is replaced and the
replacement serves its batches; workers join and leave on queue depth or by hand.

A worker whose agents left too many threads hung stops taking work (`HungAgentThreads`) and is replaced too.
The task pool already takes a dead worker's leases back (its liveness pings, `TaskPoolActor.check_workers`),
so the rollouts it ran go to the others. What the pool cannot do is start a worker: `RolloutWorkers.check`
notices a `work` call that ended with the actor's death, tells every pool it served (so its leases return at
once, not after a ping), starts a replacement through `start_rollout_workers` and puts it to work on every batch
still being served. After `rollout.max_worker_restarts` replacements the run stops (`WorkersExhausted`):
an agent that kills its process every time must not loop forever.

With `rollout.min_workers < rollout.max_workers`, `check` also scales (`lightning_ray.rollouts.scaling`): a new
worker joins every batch being served; a worker scaled down is drained (it leases nothing more and finishes and
reports what it runs) and only then stopped, so scaling down loses no rollout and runs none twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from lightning_ray.config import Config
from lightning_ray.faults import TaskPoolLost, WorkersExhausted, first_line, get
from lightning_ray.monitor.watchdog import PROBE_TIMEOUT_S
from lightning_ray.names import worker_prefix
from lightning_ray.rollouts.scaling import Autoscaler
from lightning_ray.rollouts.worker import HungAgentThreads, start_rollout_workers

log = logging.getLogger(__name__)
START_TIMEOUT_S = 300.0  # a replacement's gateway and agent setup
SCALE_EVERY_S = 2.0  # how often `check` reads the queue depth of an elastic run
CALL_TIMEOUT_S = 30.0  # a pool's stats, a worker's drain


@dataclass
class Serving:
    """One batch the workers serve: the pool it lives in, its sampling, and each worker's `work` call."""

    pool: Any
    sampling: dict[str, Any] | None
    calls: dict[int, ray.ObjectRef] = field(default_factory=dict)  # worker index -> work() ref


class RolloutWorkers:
    """The run's RolloutWorker actors by index: `workers` the serving ones (`rollout.num_workers` at first),
    `retiring` those scaled down and still finishing what they run."""

    def __init__(self, cfg: Config, pool: Any, prefix: str | None = None):
        prefix = prefix or worker_prefix(cfg)  # the run's own names (`lightning_ray.names`)
        self.cfg, self.pool, self.prefix = cfg, pool, prefix
        self.workers: dict[int, Any] = dict(enumerate(start_rollout_workers(cfg, pool, prefix=prefix)))
        ids = get([w.ping.remote() for w in self.workers.values()], "rollout worker ping", START_TIMEOUT_S)
        self.ids: dict[int, str] = dict(enumerate(ids))
        self.retiring: dict[int, Any] = {}
        self.serving: dict[str, Serving] = {}
        self.restarts = 0
        self.deaths: list[str] = []  # "worker i: cause", in order
        self.added = self.retired = 0
        lo, hi = cfg.rollout.worker_bounds
        r = cfg.rollout
        self.autoscaler = (
            Autoscaler(lo, hi, r.concurrency, r.scale_up_delay_s, r.scale_down_delay_s) if lo < hi else None
        )
        self.target = len(self.workers)
        self._next_index, self._next_scale = len(self.workers), 0.0

    @property
    def handles(self) -> list[Any]:
        """The serving workers' actor handles."""
        return list(self.workers.values())

    def serve(self, batch_id: str, pool: Any, sampling: dict[str, Any] | None = None) -> None:
        """Every worker leases and runs the batch's rollouts until it is done."""
        serving = Serving(pool, sampling)
        for i, worker in self.workers.items():
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

    def llm_calls(self) -> int:
        """LLM calls the serving workers' gateways recorded (`RolloutWorker.progress`, answered on a control
        thread even while an agent blocks the worker)."""
        return sum(p["calls"] for p in self._ask("progress"))

    def stale_groups(self, batch_id: str, floor: int, train_agents: list[str] | None) -> list[str]:
        """The batch's groups that some worker runs with a trained call older than policy version `floor`
        (`RolloutWorker.stale_groups`)."""
        return sorted(
            {g for groups in self._ask("stale_groups", batch_id, floor, train_agents) for g in groups}
        )

    def cancel_groups(self, batch_id: str, group_ids: list[str]) -> None:
        """Every worker stops its rollouts of the groups the pool cut (`RolloutWorker.cancel_groups`)."""
        self._ask("cancel_groups", batch_id, group_ids)

    def _ask(self, method: str, *args: Any) -> list[Any]:
        """The answers of the serving workers that answer `method` within `PROBE_TIMEOUT_S`; one that died is
        left out (`check` replaces it)."""
        refs = [getattr(w, method).remote(*args) for w in self.handles]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        answers = []
        for ref in done:
            try:
                answers.append(ray.get(ref))
            except RayActorError:
                continue
        return answers

    def release(self, batch_id: str) -> dict[int, Any]:
        """Forget a finished batch; returns what each worker's `work` returned."""
        serving = self.serving.pop(batch_id)
        return {i: ray.get(ref) for i, ref in serving.calls.items()}

    def check(self) -> list[int]:
        """Replace every worker whose `work` call ended with its death, or with `HungAgentThreads` (agent
        threads that will not stop are only freed with the process); re-raise any other crash of a worker.
        Then stop the retiring workers that have finished, and scale an elastic run. Returns the indices
        replaced."""
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
            if i in self.retiring:  # scaled down anyway: the pools run what it held again
                self._gone(i, f"scaled down ({cause})")
            else:
                self._replace(i, cause)
        for i in [i for i in self.retiring if self._drained(i)]:
            self._gone(i, "scaled down")
        self.scale()
        return [i for i in dead if i in self.workers]

    def _pools(self) -> list[Any]:
        """Every pool the workers serve: the run's own and those of the batches being served."""
        return list(
            ({id(s.pool): s.pool for s in self.serving.values()} | {id(self.pool): self.pool}).values()
        )

    def _replace(self, index: int, cause: str) -> None:
        self.deaths.append(f"worker {index}: {cause}")
        if self.restarts >= self.cfg.rollout.max_worker_restarts:
            raise WorkersExhausted(
                f"{len(self.deaths)} rollout workers died, rollout.max_worker_restarts="
                f"{self.cfg.rollout.max_worker_restarts} replacements used up: {'; '.join(self.deaths)}"
            )
        self.restarts += 1
        log.warning("rollout worker %d died (%s); starting replacement %d", index, cause, self.restarts)
        self._report_gone(self.ids[index], cause)
        ray.kill(self.workers[index])
        self._start(index, f"{self.prefix}-{index}.r{self.restarts}")

    def _start(self, index: int, prefix: str, first: int = 0) -> None:
        """Worker `index` (new or a replacement), the actor `<prefix>-<first>`, put to work on every batch
        being served."""
        one = self.cfg.model_copy(update={"rollout": self.cfg.rollout.model_copy(update={"num_workers": 1})})
        (new,) = start_rollout_workers(one, self.pool, prefix=prefix, first=first)
        self.workers[index] = new
        self.ids[index] = get(new.ping.remote(), "rollout worker ping", START_TIMEOUT_S)
        for batch_id, serving in self.serving.items():
            serving.calls[index] = new.work.remote(batch_id, serving.pool, serving.sampling)

    def _report_gone(self, worker_id: str, cause: str) -> None:
        """Tell every pool: the worker's leases go back to the queue now, and its pings stop."""
        get(
            [p.report_worker_dead.remote(worker_id, cause) for p in self._pools()],
            "task pool report_worker_dead",
            self.cfg.trainer.stall_timeout_s,
        )

    # ------------------------------------------------------------------ elastic workers

    def scale(self) -> None:
        """An elastic run's worker count, at most every `SCALE_EVERY_S`: set by hand (`lightning-ray scale`)
        or on the train pool's queue depth (`Autoscaler`)."""
        if self.autoscaler is None or time.monotonic() < self._next_scale:
            return
        stats = get(self.pool.stats.remote(), "task pool stats", CALL_TIMEOUT_S, TaskPoolLost)
        now = time.monotonic()
        demand = stats["queued"] + stats["leased"]
        self.target = self.autoscaler.decide(len(self.workers), demand, now, stats["workers_requested"])
        self.scale_to(self.target)
        self._next_scale = time.monotonic() + SCALE_EVERY_S

    def scale_to(self, n: int) -> None:
        """Start workers, or drain the newest ones, until `n` serve."""
        while len(self.workers) < n:
            index, self._next_index = self._next_index, self._next_index + 1
            self._start(index, self.prefix, first=index)
            self.added += 1
            log.warning("rollout worker %d added: %d workers serve", index, len(self.workers))
        while len(self.workers) > n:
            index = max(self.workers)
            worker = self.retiring[index] = self.workers.pop(index)
            get(worker.drain.remote(), f"rollout worker {index} drain", CALL_TIMEOUT_S)
            get(
                [p.retire_worker.remote(self.ids[index]) for p in self._pools()],
                "task pool retire_worker",
                CALL_TIMEOUT_S,
                TaskPoolLost,
            )
            self.retired += 1
            log.warning("rollout worker %d drains: %d workers serve", index, len(self.workers))

    def _drained(self, index: int) -> bool:
        """Whether a retiring worker's `work` calls have all returned."""
        calls = [s.calls[index] for s in self.serving.values() if index in s.calls]
        return not calls or not ray.wait(calls, num_returns=len(calls), timeout=0)[1]

    def _gone(self, index: int, cause: str) -> None:
        """A retiring worker leaves: out of every batch, reported to the pools, stopped."""
        from lightning_ray.rollouts.stack import stop_workers

        worker = self.retiring.pop(index)
        for serving in self.serving.values():
            serving.calls.pop(index, None)
        self._report_gone(self.ids[index], cause)
        stop_workers([worker])

    def metrics(self) -> dict[str, int]:
        """The workers' counts for a step's metrics."""
        return {
            "rollout/workers": len(self.workers),
            "rollout/workers_target": self.target,
            "rollout/workers_retiring": len(self.retiring),
            "rollout/workers_added": self.added,
            "rollout/workers_retired": self.retired,
            "rollout/worker_restarts": self.restarts,
        }

    def stop(self) -> None:
        """Stop every worker: agent teardown and gateway, bounded; the dead ones are only logged."""
        from lightning_ray.rollouts.stack import stop_workers

        stop_workers(self.handles + list(self.retiring.values()))
