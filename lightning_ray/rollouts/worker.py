"""RolloutWorker: a Ray actor that runs many user rollouts at once, each behind its own gateway route.

One worker = one asyncio loop + one gateway sidecar + the user's agent. It leases rollouts from the TaskPool,
runs up to `rollout.concurrency` of them concurrently (sync agents in a thread pool), enforces the timeout,
classifies every ending, and reports each finished group to the pool in one call: its Arrow tables, which the
TaskPool actor then owns (so a worker that dies after reporting loses nothing), and how each rollout ended.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from lightning_ray.agent import LLM
from lightning_ray.agent.api import call_agent, load_agent
from lightning_ray.agent.rewards import EmittedReward, coerce_reward, open_reward_sink, rollout_reward
from lightning_ray.config import Config
from lightning_ray.data.schema import FinishedRollout, Transition, group_tables
from lightning_ray.monitor.busy import BusyTime
from lightning_ray.monitor.errors import classify_outcome
from lightning_ray.rollouts import capture
from lightning_ray.tasks.records import Lease, RolloutReport


def credit_emitted(transitions: list[Transition], emitted: list[EmittedReward]) -> None:
    """Per-call rewards: an emitted reward is credited to the LLM call it follows (summed per call)."""
    per_call: dict[int, float] = defaultdict(float)
    for r in emitted:
        if r.call_index is not None:
            per_call[r.call_index] += r.value
    for t in transitions:
        if t.call_index in per_call:
            t.reward = per_call[t.call_index]


def _report_of(r: FinishedRollout) -> RolloutReport:
    failure = None
    if r.status != "succeeded":
        failure = {
            "kind": r.failure_kind,
            "exc_type": r.error_type,
            "message": r.error_message or "",
            "traceback": r.traceback or "",
        }
    return RolloutReport(r.rollout_id, r.attempt, r.status, r.failure_kind, r.reward, failure)


def reward_dims(emitted: list[EmittedReward]) -> dict[str, float]:
    dims: dict[str, float] = defaultdict(float)
    for r in emitted:
        for k, v in r.dims.items():
            dims[k] += v
    return dict(dims)


class RolloutWorker:
    """Use as a Ray actor (see `start_rollout_workers`)."""

    def __init__(self, worker_id: str, cfg: dict[str, Any], pool: Any, pythonpath: list[str]):
        for path in reversed(pythonpath):
            if path not in sys.path:
                sys.path.insert(0, path)
        self.worker_id, self.cfg, self.pool = worker_id, Config.model_validate(cfg), pool
        self.agent = load_agent(self.cfg.rollout.agent)
        self.executor = ThreadPoolExecutor(
            max_workers=self.cfg.rollout.concurrency, thread_name_prefix="agent"
        )
        self.gateway = None
        self.busy = BusyTime()
        capture.install()

    async def start(self) -> str:
        """Start the gateway sidecar, run the agent's setup, register with the pool; returns the gateway URL."""
        from lightning_ray.gateway.server import start_gateway

        self.gateway = await start_gateway(self.cfg)
        if self.agent.setup is not None:
            await call_agent(self.agent.setup, executor=self.executor)
        await self.pool.register_worker.remote(self.worker_id, ray.get_runtime_context().current_actor)
        return self.gateway.url

    def ping(self) -> str:
        return self.worker_id

    def busy_seconds(self) -> float:
        """Seconds this worker had at least one rollout running, since it started (a running total, so the
        driver takes differences)."""
        return self.busy.seconds()

    async def work(
        self, batch_id: str, pool: Any = None, sampling: dict[str, Any] | None = None
    ) -> dict[str, int]:
        """Lease and run rollouts until the batch is done (an open batch, a stream, only once it is closed and
        every rollout ended); returns counts of what this worker ran.

        `pool` runs a batch of another TaskPool (validation); `sampling` overrides the configured sampling
        the agents are given (e.g. `{"temperature": 0.0}` for greedy validation).

        One lease call is always out while there is room for more rollouts; the pool answers it as soon as work
        comes in (or the batch is done), so neither an idle nor a busy worker polls.
        """
        pool = pool or self.pool
        running: dict[asyncio.Future, Lease] = {}
        finished: dict[str, list[FinishedRollout]] = defaultdict(list)
        counts = {"rollouts": 0, "tables": 0}
        asking: asyncio.Future | None = None  # the lease call that is out
        batch_done = False  # the pool said so: ask for no more work, finish what runs
        renew_every = self.cfg.rollout.lease_timeout_s / 3
        next_renew = time.monotonic() + renew_every
        while True:
            free = self.cfg.rollout.concurrency - len(running)
            if asking is None and free > 0 and not batch_done:
                asking = asyncio.ensure_future(
                    pool.lease.remote(self.worker_id, free, wait_s=renew_every, batch_id=batch_id)
                )
            if batch_done and not running:
                return counts
            waiting = [*running, *([asking] if asking is not None else [])]
            timeout = max(0.0, next_renew - time.monotonic())
            done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if asking in done:
                leases, asking = asking.result(), None
                for lease in leases:
                    running[asyncio.create_task(self._run_one(lease, sampling or {}))] = lease
                if not leases:
                    batch_done = await pool.batch_done.remote(batch_id)
            for task in done & running.keys():
                lease = running.pop(task)
                if not task.cancelled():
                    finished[lease.group_id].append(task.result())
                    counts["rollouts"] += 1
            # A group goes out once this worker runs none of its rollouts any more.
            active_groups = {lease.group_id for lease in running.values()}
            for group_id in [g for g in finished if g not in active_groups]:
                await self._report(pool, finished.pop(group_id))
                counts["tables"] += 1
            if time.monotonic() >= next_renew:
                if running:
                    held = [(lease.rollout_id, lease.attempt) for lease in running.values()]
                    kept = set(await pool.renew.remote(self.worker_id, held))
                    for task, lease in running.items():
                        if lease.rollout_id not in kept:
                            task.cancel()  # revoked: someone else runs it now
                next_renew = time.monotonic() + renew_every

    async def _report(self, pool: Any, rollouts: list[FinishedRollout]) -> None:
        """The group's tables and how each of its rollouts ended, in one call to the pool."""
        await pool.report_group.remote(group_tables(rollouts), [_report_of(r) for r in rollouts])

    async def _run_one(self, lease: Lease, overrides: dict[str, Any]) -> FinishedRollout:
        with self.busy.running():
            return await self._rollout(lease, overrides)

    async def _rollout(self, lease: Lease, overrides: dict[str, Any]) -> FinishedRollout:
        rid = lease.rollout_id
        llm = LLM.for_rollout(
            self.gateway.url,
            rid,
            api_key=self.gateway.api_key,
            model=self.gateway.served_model,
            sampling=self.cfg.inference.sampling,
            **overrides,
        )
        self.gateway.open_rollout(rid)
        exception, timed_out, returned = None, False, None
        t0 = time.perf_counter()

        def latest_call() -> int | None:
            calls = self.gateway.transitions(rid)
            return calls[-1].call_index if calls else None

        with capture.captured() as output, open_reward_sink(rid, latest_call) as sink:
            try:
                returned = await asyncio.wait_for(
                    call_agent(self.agent.rollout, dict(lease.task), llm, executor=self.executor),
                    timeout=self.cfg.rollout.timeout_s,
                )
                returned = coerce_reward(returned)
            except TimeoutError as e:
                exception, timed_out = e, True
            except asyncio.CancelledError:
                self.gateway.close_rollout(rid)  # lease revoked: the rollout runs elsewhere now
                raise
            except Exception as e:
                exception = e
        transitions = self.gateway.close_rollout(rid)
        emitted = sink.rewards
        credit_emitted(transitions, emitted)
        reward = None if exception is not None else rollout_reward(returned, emitted)
        failure = classify_outcome(
            exception=exception,
            timed_out=timed_out,
            timeout_s=self.cfg.rollout.timeout_s,
            reward=reward,
            last_finish_reason=transitions[-1].finish_reason if transitions else None,
            llm_base_url=llm.base_url,
        )
        return FinishedRollout(
            rollout_id=rid,
            task_id=lease.task_id,
            group_id=lease.group_id,
            attempt=lease.attempt,
            status="succeeded" if failure is None else failure.status,
            transitions=transitions,
            reward=reward,
            reward_dims=reward_dims(emitted),
            failure_kind=failure.kind if failure else None,
            error_type=failure.exc_type if failure else None,
            error_message=failure.message if failure else None,
            traceback=failure.traceback if failure else None,
            duration_s=time.perf_counter() - t0,
            worker=self.worker_id,
            logs=output.getvalue(),
        )

    async def stop(self) -> None:
        if self.agent.teardown is not None:
            await call_agent(self.agent.teardown, executor=self.executor)
        if self.gateway is not None:
            await self.gateway.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)


def start_rollout_workers(cfg: Config, pool: Any, prefix: str = "rollout-worker") -> list[Any]:
    """Start `rollout.num_workers` workers (fractional CPUs) and wait until each gateway is up."""
    actor = ray.remote(RolloutWorker)
    pythonpath = [os.getcwd()] + ([os.path.dirname(cfg.source)] if cfg.source else [])
    workers = [
        actor.options(
            num_cpus=cfg.rollout.num_cpus_per_worker,
            max_concurrency=cfg.rollout.concurrency * 4 + 16,
            name=f"{prefix}-{i}",
        ).remote(f"{prefix}-{i}-{os.urandom(3).hex()}", cfg.model_dump(), pool, pythonpath)
        for i in range(cfg.rollout.num_workers)
    ]
    ray.get([w.start.remote() for w in workers])
    return workers
