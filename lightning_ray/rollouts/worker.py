"""RolloutWorker: a Ray actor that runs many user rollouts at once, each behind its own gateway route.

One worker = one asyncio loop + one gateway sidecar + the user's agent. It leases rollouts from the TaskPool,
runs up to `rollout.concurrency` of them concurrently, enforces the timeout, classifies every ending, and reports
each finished group to the pool in one call: its Arrow tables, which the TaskPool actor then owns (so a worker
that dies after reporting loses nothing), and how each rollout ended.

Each rollout's agent runs on a thread of its own (an async agent on a fresh event loop there, see
`isolation.py`), never on the loop that serves the gateway: an agent that blocks, hangs, exits or leaks threads
ends its own rollout only. A thread that will not stop is left running and counted (`progress()`); past
`rollout.max_hung_threads` the worker takes no more work and `work()` raises `HungAgentThreads`, so the driver can replace
the process (a thread cannot be killed, a process can).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import defaultdict
from typing import Any

import ray

from lightning_ray.agent import LLM
from lightning_ray.agent.api import load_agent
from lightning_ray.agent.rewards import open_reward_sink
from lightning_ray.config import Config
from lightning_ray.data.schema import FinishedRollout, Transition, group_tables
from lightning_ray.faults import STARTUP_DEADLINE_S, get
from lightning_ray.monitor.busy import BusyTime
from lightning_ray.monitor.errors import classify_outcome
from lightning_ray.rollouts import capture
from lightning_ray.rollouts.endings import finished_rollout, report_of
from lightning_ray.rollouts.isolation import AgentOutcome, AgentThread, OutlivingThreads
from lightning_ray.tasks.records import Lease

log = logging.getLogger(__name__)


class HungAgentThreads(RuntimeError):
    """Too many agent threads of this worker would not stop: it takes no more work, replace it."""


class RolloutWorker:
    """Use as a Ray actor (see `start_rollout_workers`)."""

    def __init__(self, worker_id: str, cfg: dict[str, Any], pool: Any, pythonpath: list[str]):
        for path in reversed(pythonpath):
            if path not in sys.path:
                sys.path.insert(0, path)
        self.worker_id, self.cfg, self.pool = worker_id, Config.model_validate(cfg), pool
        self.agent = load_agent(self.cfg.rollout.agent)
        self.gateway = None
        self.busy = BusyTime()
        self.outliving = OutlivingThreads()
        self.open_rollouts: set[str] = set()
        self.closed_calls = 0  # LLM calls recorded in rollouts that have ended
        self.rollouts_finished = 0
        self.draining = False  # `drain()`: lease nothing more, finish what runs
        self.running: dict[str, dict[asyncio.Future, Lease]] = {}  # by batch: each rollout running, its lease
        capture.install()

    async def start(self) -> str:
        """Start the gateway sidecar, run the agent's setup, register with the pool; returns the gateway URL."""
        from lightning_ray.gateway.server import start_gateway

        self.gateway = await start_gateway(self.cfg)
        if self.agent.setup is not None:
            outcome = await AgentThread(self.agent.setup, name=f"agent-setup-{self.worker_id}").wait()
            if outcome.error is not None:  # SystemExit included: an agent does not end the actor
                raise RuntimeError(
                    f"rollout worker {self.worker_id}: the agent's setup raised {outcome.error!r}"
                ) from outcome.error
        await self.pool.register_worker.remote(self.worker_id, ray.get_runtime_context().current_actor)
        return self.gateway.url

    def ping(self) -> str:
        return self.worker_id

    def busy_seconds(self) -> float:
        """Seconds this worker had at least one rollout running, since it started (a running total, so the
        driver takes differences)."""
        return self.busy.seconds()

    @ray.method(concurrency_group="control")
    def drain(self) -> None:
        """Lease no more rollouts: every `work` call returns once the rollouts it runs have finished and been
        reported (an elastic run scales this worker down, `RolloutWorkers.scale_to`). The driver also retires
        the worker in its pools, which answers a lease call that waits for work at once."""
        self.draining = True

    @ray.method(concurrency_group="control")
    def progress(self) -> dict[str, int]:
        """What this worker got done so far, answered on its own thread even while the worker's loop is busy:
        LLM calls the gateway recorded, rollouts finished, agent threads hung (left running after their
        rollout ended). A watchdog tells a stalled worker from a slow one by whether these move."""
        calls = self.closed_calls
        for rid in list(self.open_rollouts):
            try:
                calls += len(self.gateway.transitions(rid))
            except KeyError:  # closed meanwhile: counted in closed_calls, or about to be
                continue
        return {
            "calls": calls,
            "rollouts_finished": self.rollouts_finished,
            "hung_threads": len(self.outliving.hung()),
        }

    async def work(
        self, batch_id: str, pool: Any = None, sampling: dict[str, Any] | None = None
    ) -> dict[str, int]:
        """Lease and run rollouts until the batch is done (an open batch, a stream, only once it is closed and
        every rollout ended); returns counts of what this worker ran.

        `pool` runs a batch of another TaskPool (validation); `sampling` overrides the configured sampling
        the agents are given (e.g. `{"temperature": 0.0}` for greedy validation), and its `prompts` the
        config's named prompts (`llm.prompt`, the candidates `lightning-ray optimize` scores).

        One lease call is always out while there is room for more rollouts; the pool answers it as soon as work
        comes in (or the batch is done), so neither an idle nor a busy worker polls. With `rollout.max_hung_threads`
        agent threads hung, it leases no more, finishes what runs and raises `HungAgentThreads`. Once drained
        (`drain`) it leases no more either, finishes what runs and returns.
        """
        running: dict[asyncio.Future, Lease] = {}
        self.running[batch_id] = running  # what `stale_groups` and `cancel_groups` look at
        try:
            return await self._work(batch_id, pool or self.pool, sampling, running)
        finally:
            del self.running[batch_id]

    async def _work(
        self, batch_id: str, pool: Any, sampling: dict[str, Any] | None, running: dict[asyncio.Future, Lease]
    ) -> dict[str, int]:
        finished: dict[str, list[FinishedRollout]] = defaultdict(list)
        counts = {"rollouts": 0, "tables": 0}
        asking: asyncio.Future | None = None  # the lease call that is out
        batch_done = False  # the pool said so: ask for no more work, finish what runs
        renew_every = self.cfg.rollout.lease_timeout_s / 3
        next_renew = time.monotonic() + renew_every
        while True:
            hung = self.outliving.hung()
            free = self.cfg.rollout.concurrency - len(running)
            if (
                asking is None
                and free > 0
                and not batch_done
                and not self.draining
                and len(hung) < self.cfg.rollout.max_hung_threads
            ):
                asking = asyncio.ensure_future(
                    pool.lease.remote(self.worker_id, free, wait_s=renew_every, batch_id=batch_id)
                )
            if (batch_done or self.draining) and not running and asking is None:
                return counts
            if not running and asking is None:  # no room for work: too many hung threads
                raise HungAgentThreads(
                    f"rollout worker {self.worker_id}: {len(hung)} agent threads would not stop "
                    f"(limit {self.cfg.rollout.max_hung_threads}): {'; '.join(hung[:8])}"
                )
            waiting = [*running, *([asking] if asking is not None else [])]
            timeout = max(0.0, next_renew - time.monotonic())
            done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if asking in done:
                leases, asking = asking.result(), None
                for lease in leases:
                    running[asyncio.create_task(self._run_one(lease, sampling or {}))] = lease
                if not leases and not self.draining:
                    batch_done = await pool.batch_done.remote(batch_id)
            for task in done & running.keys():
                lease = running.pop(task)
                if not task.cancelled():
                    finished[lease.group_id].append(task.result())
                    counts["rollouts"] += 1
            # A group goes out once this worker runs none of its rollouts any more, and what has finished goes
            # out at each lease renewal: a long-running group's finished rollouts reach the pool (a checkpoint
            # keeps them, a worker's death does not take them along).
            renewing = time.monotonic() >= next_renew
            active_groups = set() if renewing else {lease.group_id for lease in running.values()}
            for group_id in [g for g in finished if g not in active_groups]:
                await self._report(pool, finished.pop(group_id))
                counts["tables"] += 1
            if renewing:
                if running:
                    held = [(lease.rollout_id, lease.attempt) for lease in running.values()]
                    kept = set(await pool.renew.remote(self.worker_id, held))
                    for task, lease in running.items():
                        if lease.rollout_id not in kept:
                            task.cancel()  # revoked: someone else runs it now
                next_renew = time.monotonic() + renew_every

    async def stale_groups(self, batch_id: str, floor: int, train_agents: list[str] | None) -> list[str]:
        """The batch's groups of which this worker runs a rollout that made a trained call (`train_agents`,
        None: all) on a policy version older than `floor`: no batch that accepts only `floor` or newer can
        train them. Calls still running are not known yet (a later look finds them)."""
        stale = set()
        for lease in self.running.get(batch_id, {}).values():
            try:
                calls = self.gateway.transitions(lease.rollout_id)
            except KeyError:  # closed meanwhile: it has ended
                continue
            if any(
                c.policy_version < floor and (train_agents is None or c.agent in train_agents) for c in calls
            ):
                stale.add(lease.group_id)
        return sorted(stale)

    async def cancel_groups(self, batch_id: str, group_ids: list[str]) -> int:
        """Stop this worker's rollouts of groups the pool has cut (`TaskPool.cut_groups`) now, not at the next
        lease renewal: their agents get no more calls and free their slots. Returns how many it stopped."""
        cut = set(group_ids)
        tasks = [task for task, lease in self.running.get(batch_id, {}).items() if lease.group_id in cut]
        for task in tasks:
            task.cancel()
        return len(tasks)

    async def _report(self, pool: Any, rollouts: list[FinishedRollout]) -> None:
        """The group's tables and how each of its rollouts ended, in one call to the pool."""
        await pool.report_group.remote(group_tables(rollouts), [report_of(r) for r in rollouts])

    async def _run_one(self, lease: Lease, overrides: dict[str, Any]) -> FinishedRollout:
        with self.busy.running():
            finished = await self._rollout(lease, overrides)
        self.rollouts_finished += 1
        return finished

    async def _run_agent(self, rid: str, task: dict, llm: LLM) -> AgentOutcome:
        """The agent on its own thread, awaited with the rollout timeout (raises TimeoutError). An agent that
        times out or is cancelled (lease revoked) is asked to stop and its thread watched from then on."""
        agent = AgentThread(self.agent.rollout, task, llm, name=f"agent-{rid}")
        try:
            outcome = await agent.wait(self.cfg.rollout.timeout_s)
        except BaseException:
            agent.cancel()
            self.outliving.add(agent.thread, rid)
            raise
        for thread in outcome.leaked + outcome.lingering:
            self.outliving.add(thread, rid)
        return outcome

    def _close(self, rid: str) -> list[Transition]:
        transitions = self.gateway.close_rollout(rid)
        self.closed_calls += len(transitions)
        self.open_rollouts.discard(rid)
        return transitions

    async def _rollout(self, lease: Lease, overrides: dict[str, Any]) -> FinishedRollout:
        rid = lease.rollout_id
        llm = LLM.for_rollout(
            self.gateway.url,
            rid,
            api_key=self.gateway.api_key,
            model=self.gateway.served_model,
            sampling=self.cfg.inference.sampling,
            **{"prompts": self.cfg.prompts, **overrides},  # a batch's prompts replace the config's
        )
        self.gateway.open_rollout(rid, lease.group_order)
        self.open_rollouts.add(rid)
        exception, timed_out, returned = None, False, None
        t0 = time.perf_counter()

        def latest_call() -> int | None:
            calls = self.gateway.transitions(rid)
            return calls[-1].call_index if calls else None

        with capture.captured() as output, open_reward_sink(rid, latest_call) as sink:
            try:
                outcome = await self._run_agent(rid, dict(lease.task), llm)
            except TimeoutError as e:
                exception, timed_out = e, True
            except asyncio.CancelledError:
                self._close(rid)  # lease revoked: the rollout runs elsewhere now
                raise
            else:
                exception, returned = outcome.ending()
        transitions = self._close(rid)
        ending = returned
        if exception is not None:
            ending = classify_outcome(
                exception=exception,
                timed_out=timed_out,
                timeout_s=self.cfg.rollout.timeout_s,
                llm_base_url=llm.base_url,
            )
        return finished_rollout(
            lease,
            transitions,
            sink.rewards,
            ending,
            duration_s=time.perf_counter() - t0,
            worker=self.worker_id,
            logs=output.getvalue(),
            secret=self.cfg.gateway.token(),
        )

    async def stop(self) -> None:
        """Run the agent's teardown (on its own thread, within `rollout.timeout_s`), then stop the gateway."""
        if self.agent.teardown is not None:
            teardown = AgentThread(self.agent.teardown, name=f"agent-teardown-{self.worker_id}")
            try:
                outcome = await teardown.wait(self.cfg.rollout.timeout_s)
            except TimeoutError:
                teardown.cancel()
                log.warning("rollout worker %s: the agent's teardown did not finish", self.worker_id)
            else:
                if outcome.error is not None:
                    log.warning(
                        "rollout worker %s: the agent's teardown raised %r", self.worker_id, outcome.error
                    )
        if self.gateway is not None:
            await self.gateway.stop()


def start_rollout_workers(
    cfg: Config, pool: Any, prefix: str = "rollout-worker", first: int = 0
) -> list[Any]:
    """Start `rollout.num_workers` workers (fractional CPUs), the named actors `<prefix>-<first + i>`, and wait
    until each gateway is up (at most
    `trainer.stall_timeout_s`, and at least `STARTUP_DEADLINE_S`: an agent's setup that hangs is `RunStalled`,
    not a silent wait)."""
    # progress() runs in the "control" group: a thread and loop of its own, free while the worker's loop is busy
    actor = ray.remote(concurrency_groups={"control": 1})(RolloutWorker)
    pythonpath = [os.getcwd()] + ([os.path.dirname(cfg.source)] if cfg.source else [])
    workers = [
        actor.options(
            num_cpus=cfg.rollout.num_cpus_per_worker,
            max_concurrency=cfg.rollout.concurrency * 4 + 16,
            name=f"{prefix}-{i}",
            **cfg.rollout.placement.actor_options(),  # which nodes (`rollout.placement`)
        ).remote(f"{prefix}-{i}-{os.urandom(3).hex()}", cfg.model_dump(), pool, pythonpath)
        for i in range(first, first + cfg.rollout.num_workers)
    ]
    starts = [w.start.remote() for w in workers]
    try:
        get(
            starts,
            "rollout workers' start (gateway, agent setup)",
            max(STARTUP_DEADLINE_S, cfg.trainer.stall_timeout_s),
        )
    except BaseException:
        for worker in workers:  # named actors: they must not outlive a failed start
            ray.kill(worker)
        raise
    return workers
