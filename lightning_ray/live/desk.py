"""The live gateway's state: which live rollouts are open, which are grouped, and how each one ends.

A client opens a rollout (`POST /rollouts`, as `lightning-ray serve` always did) and calls the OpenAI URL it
gets. When its first call is recorded, a `live.group_fraction` share of rollouts starts a group in the live pool
(`LivePool.start_live_group`): index 0 is the client's rollout, indices 1.. are extra completions of that first
request sampled here in the background (never returned to anyone) and rewarded by the scorer. The client's
rollout ends with the reward it posts (`POST /rollouts/{id}/reward`), or with the scorer's (`live.score_user`),
or, `live.reward_deadline_s` after its last call without one, is dropped as `reward_deadline`. Every ending is reported to the
pool through `report_group` like any runner's, so the training loop takes complete groups from its stream.

Rollouts outside the grouped share are singletons: recorded, rewarded and logged, never trained. Every live
rollout's ending is a line of RUN_DIR/live.jsonl with the policy version that served it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.exceptions import RayError

from lightning_ray.agent.rewards import coerce_reward
from lightning_ray.config import Config
from lightning_ray.data.schema import Transition, group_tables
from lightning_ray.gateway.calls import Call, GatewayState, generate, record
from lightning_ray.gateway.protocol import GatewayError
from lightning_ray.gateway.recorder import Recorder, UnknownRollout
from lightning_ray.gateway.render import Prompt, decode
from lightning_ray.live.hooks import on_live_reward
from lightning_ray.live.pool import LIVE_RUNNER
from lightning_ray.live.scorer import Scorer
from lightning_ray.monitor.errors import Failure, classify_exception
from lightning_ray.rollouts.endings import finished_rollout, report_of
from lightning_ray.tasks.dataset import Task
from lightning_ray.tasks.records import Lease

log = logging.getLogger(__name__)
DEADLINE = "reward_deadline"
SWEEP_S = 0.5
REMEMBERED_ENDINGS = 10_000


@dataclass
class LiveRollout:
    rollout_id: str
    opened: float  # monotonic
    grouped: bool
    last: (
        float  # monotonic: its last call's start or end, or its opening; the reward deadline counts from here
    )
    in_flight: int = 0  # calls started and not recorded (a call that fails records nothing)
    policy_version: int | None = None  # of its first call
    leases: list[Lease] = field(default_factory=list)  # its group's, index 0 its own; [] until it starts
    starting: asyncio.Task | None = None
    reward: float | None = None


class LiveRecorder(Recorder):
    """The gateway's recorder, telling the desk when a live rollout opens and when a call of it is recorded."""

    def __init__(self, desk: LiveDesk) -> None:
        super().__init__()
        self.desk = desk

    def open(self, rollout_id: str, priority: int = 0) -> None:
        super().open(rollout_id, priority)
        self.desk.opened(rollout_id)

    def reserve(self, rollout_id: str) -> tuple[int, int]:
        reserved = super().reserve(rollout_id)
        self.desk.calling(rollout_id)
        return reserved

    def record(self, rollout_id: str, transition: Transition, prior: Any) -> bool:
        kept = super().record(rollout_id, transition, prior)
        if kept:
            self.desk.recorded(rollout_id, transition)
        return kept


class LiveDesk:
    def __init__(self, cfg: Config, pool: Any, run_dir: Path, scorer: Scorer | None) -> None:
        self.cfg, self.live_cfg, self.pool, self.scorer = cfg, cfg.live, pool, scorer
        self.log_path = run_dir / "live.jsonl"
        self.rollouts: dict[str, LiveRollout] = {}
        self.extras: set[str] = set()  # pool rollout ids of extra samples (recorded, never live)
        self.ended: dict[str, str] = {}  # rollout id -> how it ended
        self.counts: Counter[str] = Counter()
        self.background: set[asyncio.Task] = set()
        self.state: GatewayState | None = None
        self.random = random.Random(cfg.trainer.seed)

    def attach(self, state: GatewayState) -> None:
        """Take over the gateway's recorder and start the deadline sweep (on the gateway's event loop)."""
        state.recorder = LiveRecorder(self)
        self.state = state
        self._spawn(self._sweep_forever())

    # ------------------------------------------------------------------ traffic

    def opened(self, rollout_id: str) -> None:
        if rollout_id in self.extras:
            return
        grouped = self.random.random() < self.live_cfg.group_fraction
        now = time.monotonic()
        self.rollouts[rollout_id] = LiveRollout(rollout_id, now, grouped, last=now)
        self.counts["opened"] += 1

    def calling(self, rollout_id: str) -> None:
        """A call of a live rollout starts: no deadline while it runs (see `sweep`)."""
        rollout = self.rollouts.get(rollout_id)
        if rollout is not None:
            rollout.last, rollout.in_flight = time.monotonic(), rollout.in_flight + 1

    def recorded(self, rollout_id: str, transition: Transition) -> None:
        """A call of a live rollout was recorded: its deadline starts again; the first one starts its group."""
        rollout = self.rollouts.get(rollout_id)
        if rollout is None:
            return
        rollout.last, rollout.in_flight = time.monotonic(), max(0, rollout.in_flight - 1)
        if transition.call_index != 0:
            return
        rollout.policy_version = transition.policy_version
        if rollout.grouped:
            rollout.starting = self._spawn(self._start_group(rollout, transition))

    async def _start_group(self, rollout: LiveRollout, first: Transition) -> None:
        assert self.state is not None
        prompt = decode(self.state.tokenizer, first.prompt_ids, skip_special_tokens=False)
        data = {"rollout_id": rollout.rollout_id, "prompt": prompt, "policy_version": first.policy_version}
        try:
            leases = await self.pool.start_live_group.remote(Task(f"live-{rollout.rollout_id}", data))
        except RayError:
            leases = []
        if not leases:  # the loop has no open stream (starting or ended): a singleton
            rollout.grouped = False
            return
        rollout.leases = leases
        self.counts["groups"] += 1
        for lease in leases[1:]:  # in the background: a reward posted now need not wait for them
            self._spawn(self._extra(lease, first, prompt))
        if self.live_cfg.score_user:
            self._spawn(self._score_user(rollout, first, prompt))

    async def _score_user(self, rollout: LiveRollout, first: Transition, prompt: str) -> None:
        """`live.score_user`: the client's rollout ends with the scorer's reward of its first completion."""
        ending = await self._score(prompt, first.response_text)
        if self.rollouts.get(rollout.rollout_id) is rollout:
            await self._end(rollout, *((None, ending) if isinstance(ending, Failure) else (ending, None)))

    async def _extra(self, lease: Lease, first: Transition, prompt: str) -> None:
        """One extra sample of the first request under `lease`, rewarded by the scorer and reported."""
        assert self.state is not None
        started, rid = time.monotonic(), lease.rollout_id
        self.extras.add(rid)
        self.state.recorder.open(rid)
        ending: Failure | float
        try:
            call = self._call(rid, first)
            ending = await self._score(prompt, record(self.state, call, await generate(self.state, call)))
        except Exception as e:  # the engine's or the gateway's error: this sample fails, its group goes on
            ending = classify_exception(e)
        transitions = self.state.recorder.close(rid)
        self.extras.discard(rid)
        await self._report(lease, transitions, ending, time.monotonic() - started)
        self.counts["extras"] += 1

    def _call(self, rollout_id: str, first: Transition) -> Call:
        assert self.state is not None
        sampling = dict(self.state.sampling_defaults)
        room = self.state.max_model_len - len(first.prompt_ids)
        sampling["max_tokens"] = min(sampling.get("max_tokens") or room, room)
        prompt = Prompt(text=None, ids=list(first.prompt_ids))
        return Call(rollout_id, first.agent, "chat", first.model, prompt, sampling, call_index=0)

    async def _score(self, prompt: str, completion: str) -> float | Failure:
        if self.scorer is None:
            return Failure(kind="no_reward", message="no scorer: set live.scorer or live.judge_url")
        try:
            value = coerce_reward(await self.scorer(prompt, completion))
        except Exception as e:  # BadReward, or the scorer's own error
            return classify_exception(e)
        return value if value is not None else Failure(kind="no_reward", message="the scorer returned None")

    # ------------------------------------------------------------------ rewards and endings

    async def reward(self, rollout_id: str, value: float) -> dict[str, Any]:
        """The client's reward for its rollout: ends it (trained when grouped), calls the reward hooks."""
        rollout = self._open(rollout_id)
        if not math.isfinite(value):
            raise GatewayError(400, "reward value must be a finite number", param="value")
        if rollout.policy_version is None:
            raise GatewayError(
                409,
                f"rollout {rollout_id!r} has no recorded call yet: reward it after its calls",
                code="rollout_has_no_calls",
            )
        if rollout.starting is not None:  # its group's leases, so that the reward reaches the group
            await asyncio.shield(rollout.starting)
        rollout = self._open(rollout_id)  # ended meanwhile (another reward, the scorer, the deadline): 409
        on_live_reward(rollout.policy_version, value)
        self.counts["rewarded"] += 1
        await self._end(rollout, value, None)
        return {
            "rollout_id": rollout_id,
            "policy_version": rollout.policy_version,
            "grouped": rollout.grouped,
        }

    async def _end(self, rollout: LiveRollout, reward: float | None, failure: Failure | None) -> None:
        """End a live rollout: its trace closes, its group (if any) gets its report, live.jsonl its line."""
        assert self.state is not None
        del self.rollouts[rollout.rollout_id]
        try:
            transitions = self.state.recorder.close(rollout.rollout_id)
        except UnknownRollout:  # the client closed it (DELETE) before its reward
            transitions = []
        how = failure.kind if failure is not None else "rewarded"
        self.ended[rollout.rollout_id] = how
        while len(self.ended) > REMEMBERED_ENDINGS:
            del self.ended[next(iter(self.ended))]
        if rollout.leases:
            duration = time.monotonic() - rollout.opened
            await self._report(rollout.leases[0], transitions, failure or reward, duration)
        line = {
            "rollout_id": rollout.rollout_id,
            "policy_version": rollout.policy_version,
            "grouped": bool(rollout.leases),
            "group_id": rollout.leases[0].group_id if rollout.leases else None,
            "ended": how,
            "reward": reward,
            "calls": len(transitions),
            "time": time.time(),
        }
        with self.log_path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    async def _report(
        self, lease: Lease, transitions: list[Transition], ending: Failure | float | None, duration_s: float
    ) -> None:
        finished = finished_rollout(
            lease, transitions, [], ending, duration_s=duration_s, worker=LIVE_RUNNER, logs="", secret=None
        )
        try:
            await self.pool.report_group.remote(group_tables([finished]), [report_of(finished)])
        except RayError:  # the run is ending; the pool's lease deadline decides
            self.counts["reports_lost"] += 1

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            await self.sweep()

    async def sweep(self) -> None:
        """Drop every live rollout whose reward did not come within `live.reward_deadline_s` of its last call. A
        call still running holds it off, for at most `rollout.timeout_s` more (a failed call records nothing)."""
        deadline_s = self.live_cfg.reward_deadline_s
        now = time.monotonic()
        grace = self.cfg.rollout.timeout_s
        expired = [
            r for r in self.rollouts.values() if now - r.last > deadline_s + (grace if r.in_flight else 0.0)
        ]
        for rollout in expired:
            if rollout.starting is not None:
                await asyncio.shield(rollout.starting)
            if self.rollouts.get(rollout.rollout_id) is rollout:
                failure = Failure(
                    kind=DEADLINE,
                    message=f"no reward within live.reward_deadline_s={deadline_s:g}s of the rollout's last call",
                )
                self.counts[DEADLINE] += 1
                await self._end(rollout, None, failure)

    def _open(self, rollout_id: str) -> LiveRollout:
        rollout = self.rollouts.get(rollout_id)
        if rollout is not None:
            return rollout
        if rollout_id in self.ended:
            how = self.ended[rollout_id]
            why = {
                DEADLINE: f"dropped, no reward within live.reward_deadline_s={self.live_cfg.reward_deadline_s:g}s",
                "rewarded": "it has its reward already",
            }.get(how, f"the scorer failed on it ({how})")
            raise GatewayError(409, f"rollout {rollout_id!r} has ended: {why}", code=f"rollout_{how}")
        shown = rollout_id if len(rollout_id) <= 64 else rollout_id[:64] + "..."
        raise GatewayError(
            404,
            f"unknown live rollout {shown!r}: open it with POST /rollouts",
            param="rollout_id",
            code="rollout_not_found",
        )

    def stats(self) -> dict[str, Any]:
        return {"open": len(self.rollouts), **self.counts}

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"live-{secrets.token_hex(3)}")
        self.background.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.counts["errors"] += 1
            log.error("live gateway: %s failed", task.get_name(), exc_info=task.exception())
