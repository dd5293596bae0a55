"""The task API's state, on the gateway's event loop: the runners, the leases they hold, and recent endings.

Every decision about a rollout is the pool's (`TaskPoolActor`): a runner is a worker id to it, a lease is the
pool's lease, a heartbeat is `renew`, an ending is `report_group` with the same tables and report an in-cluster
worker sends. The desk adds what HTTP needs: a lease id per attempt (the rollout's calls are recorded under it,
so a runner that lost its lease cannot write into the next attempt's trace), the rewards a runner emits (credited
to the call they follow), and a short memory of ended leases so a late or repeated call gets a clear 409.

No background task: every request first sweeps the leases whose deadline passed (the pool has revoked them; their
recordings are dropped) and fails as `timeout` those that ran past `rollout.timeout_s` without a report.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import RayError

from lightning_ray.agent.rewards import BadReward, EmittedReward, coerce_reward
from lightning_ray.agent.urls import rollout_url
from lightning_ray.config import Config
from lightning_ray.data.schema import group_tables
from lightning_ray.gateway.protocol import GatewayError
from lightning_ray.gateway.recorder import Recorder
from lightning_ray.monitor.errors import Failure, FailureKind, classify_exception
from lightning_ray.rollouts.endings import finished_rollout, report_of
from lightning_ray.tasks.records import Lease

TIMEOUT_GRACE_S = 10.0  # past `rollout.timeout_s`, how long a runner has to report before the desk ends it
REMEMBERED_ENDINGS = 10_000
MAX_LEASES_PER_CALL = 64
MAX_WAIT_S = 30.0
RUNNER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")


@dataclass
class RemoteLease:
    lease: Lease
    runner_id: str
    deadline: float  # monotonic: the pool's deadline for it, as of the last lease or heartbeat
    started: float  # monotonic
    emitted: list[EmittedReward] = field(default_factory=list)


class RunnerDesk:
    def __init__(self, cfg: Config, pool: Any, recorder: Recorder, public_url: str, model: str) -> None:
        self.pool, self.recorder, self.public_url, self.model = pool, recorder, public_url, model
        self.lease_timeout_s = cfg.rollout.lease_timeout_s
        self.timeout_s = cfg.rollout.timeout_s
        self.sampling = cfg.inference.sampling.model_dump()
        self.prompts = dict(cfg.prompts)  # the named prompts `llm.prompt(name)` returns
        self.secret = cfg.gateway.token()
        self.runners: set[str] = set()
        self.leases: dict[str, RemoteLease] = {}
        self.ended: OrderedDict[str, str] = OrderedDict()  # lease id -> how it ended

    def settings(self, runner_id: str) -> dict[str, Any]:
        return {
            "runner_id": runner_id,
            "model": self.model,
            "sampling": self.sampling,
            "prompts": self.prompts,
            "timeout_s": self.timeout_s,
            "lease_timeout_s": self.lease_timeout_s,
            "heartbeat_s": self.lease_timeout_s / 3,
        }

    async def register(self, name: str) -> dict[str, Any]:
        if not RUNNER_NAME.match(name):
            raise GatewayError(
                400, f"invalid runner name {name[:60]!r}: 1-48 of [A-Za-z0-9_.-]", param="name"
            )
        runner_id = f"runner-{name}-{secrets.token_hex(4)}"
        await self._pool(self.pool.register_worker.remote(runner_id))
        self.runners.add(runner_id)
        return self.settings(runner_id)

    async def lease(self, runner_id: str, max_n: int, wait_s: float) -> list[dict[str, Any]]:
        await self.sweep()
        if runner_id not in self.runners:
            raise GatewayError(
                404,
                f"unknown runner {runner_id[:80]!r}: register with POST /runners",
                code="runner_not_found",
            )
        max_n, wait_s = min(max_n, MAX_LEASES_PER_CALL), min(wait_s, MAX_WAIT_S)
        granted: list[Lease] = await self._pool(self.pool.lease.remote(runner_id, max_n, wait_s=wait_s))
        now, out = time.monotonic(), []
        for lease in granted:
            for old_id, old in list(self.leases.items()):  # an earlier attempt of it was revoked
                if old.lease.rollout_id == lease.rollout_id:
                    del self.leases[old_id]
                    self._forget(old_id, f"the pool revoked it: attempt {lease.attempt} runs now")
            lease_id = secrets.token_urlsafe(16)
            self.recorder.open(lease_id)
            deadline = now + lease.expires_at - time.time()  # the pool's deadline
            self.leases[lease_id] = RemoteLease(lease, runner_id, deadline, now)
            out.append(
                {
                    "lease_id": lease_id,
                    "base_url": rollout_url(self.public_url, lease_id),
                    "rollout_id": lease.rollout_id,
                    "attempt": lease.attempt,
                    "task_id": lease.task_id,
                    "task": lease.task,
                    "group_id": lease.group_id,
                    "group_size": lease.group_size,
                    "index_in_group": lease.index_in_group,
                    "expires_at": lease.expires_at,
                }
            )
        return out

    async def heartbeat(self, lease_id: str) -> dict[str, Any]:
        await self.sweep()
        held = self._held(lease_id)
        lease = held.lease
        kept = await self._pool(self.pool.renew.remote(held.runner_id, [(lease.rollout_id, lease.attempt)]))
        if lease.rollout_id not in kept:
            if self.leases.pop(lease_id, None) is not None:
                self._forget(lease_id, "the pool revoked the lease (it expired or the run stopped it)")
            return {"held": False}
        held.deadline = time.monotonic() + self.lease_timeout_s
        return {"held": True, "expires_at": time.time() + self.lease_timeout_s}

    def emit(self, lease_id: str, value: float, dims: dict[str, float]) -> dict[str, Any]:
        held = self._held(lease_id)
        bad = [
            k
            for k, v in {"value": value, **{f"dims.{k}": v for k, v in dims.items()}}.items()
            if not math.isfinite(v)
        ]
        if bad:
            raise GatewayError(400, f"reward {bad[0]} must be a finite number", param=bad[0])
        calls = self.recorder.transitions(lease_id)
        call_index = calls[-1].call_index if calls else None
        held.emitted.append(EmittedReward(value, dict(dims), time.time(), call_index))
        return {"call_index": call_index}

    async def complete(self, lease_id: str, reward: float | None, logs: str) -> dict[str, Any]:
        """The runner's end: its returned reward (None: the emitted ones decide, or it has none)."""
        await self.sweep()
        ending: Failure | float | None
        try:
            ending = coerce_reward(reward)
        except BadReward as e:  # NaN or infinite: the rollout fails as `bad_reward`, as in-cluster
            ending = classify_exception(e)
        return await self._end(self._take(lease_id), lease_id, ending, logs)

    async def fail(self, lease_id: str, failure: Failure, logs: str) -> dict[str, Any]:
        await self.sweep()
        return await self._end(self._take(lease_id), lease_id, failure, logs)

    async def sweep(self) -> None:
        """Drop the leases whose deadline passed; end as `timeout` those running past `rollout.timeout_s`."""
        now = time.monotonic()
        for lease_id, held in list(self.leases.items()):
            if self.leases.get(lease_id) is not held:  # ended by a request while this sweep awaited
                continue
            if held.deadline < now:
                del self.leases[lease_id]
                self._forget(lease_id, f"the lease expired: no heartbeat for {self.lease_timeout_s:g}s")
            elif now - held.started > self.timeout_s + TIMEOUT_GRACE_S:
                timeout = Failure(
                    kind=FailureKind.TIMEOUT.value,
                    message=f"rollout did not finish within {self.timeout_s:g}s (its runner did not report it)",
                    detail={"timeout_s": self.timeout_s},
                )
                await self._end(self._take(lease_id), lease_id, timeout, "")

    async def _end(
        self, held: RemoteLease, lease_id: str, ending: Failure | float | None, logs: str
    ) -> dict[str, Any]:
        finished = finished_rollout(
            held.lease,
            self.recorder.close(lease_id),
            held.emitted,
            ending,
            duration_s=time.monotonic() - held.started,
            worker=held.runner_id,
            logs=logs,
            secret=self.secret,
        )
        report = report_of(finished)
        try:
            answer = await self._pool(self.pool.report_group.remote(group_tables([finished]), [report]))
        except GatewayError:
            self._remember(
                lease_id, "reporting it to the task pool failed (the pool's lease deadline decides)"
            )
            raise
        self._remember(lease_id, f"it was reported {finished.status} (pool: {answer[0]})")
        return {
            "status": finished.status,
            "kind": finished.failure_kind,
            "reward": finished.reward,
            "pool": answer[0],
        }

    def _held(self, lease_id: str) -> RemoteLease:
        held = self.leases.get(lease_id)
        if held is not None:
            return held
        if lease_id in self.ended:
            raise GatewayError(
                409, f"lease {lease_id!r} has ended: {self.ended[lease_id]}", code="lease_ended"
            )
        raise GatewayError(
            404,
            f"unknown lease {lease_id[:64]!r}: never granted here",
            param="lease_id",
            code="lease_not_found",
        )

    def _take(self, lease_id: str) -> RemoteLease:
        """The lease, no longer held: a second ending of it (or a concurrent one) gets a 409."""
        held = self._held(lease_id)
        del self.leases[lease_id]
        self._remember(lease_id, "its ending is being reported")
        return held

    def _forget(self, lease_id: str, reason: str) -> None:
        self.recorder.close(lease_id)
        self._remember(lease_id, reason)

    def _remember(self, lease_id: str, reason: str) -> None:
        self.ended[lease_id] = reason
        self.ended.move_to_end(lease_id)
        while len(self.ended) > REMEMBERED_ENDINGS:
            self.ended.popitem(last=False)

    @staticmethod
    async def _pool(ref: Any) -> Any:
        try:
            return await ref
        except RayError as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise GatewayError(
                503, f"the run's task pool did not answer: {message}", code="pool_unavailable"
            ) from None
