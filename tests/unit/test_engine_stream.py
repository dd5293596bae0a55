"""`EngineStream`'s re-send rule, on scripted generations standing in for Serve's streaming response (the real
replica kill is tests/integration/test_replica_faults.py): a stream whose replica is lost before its first
delta opens again; once a delta went to the agent, a loss fails the call."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import RayActorError

from lightning_ray.gateway.engine import EngineStream
from lightning_ray.gateway.protocol import GatewayError


class ScriptedGeneration:
    """Yields `deltas`, then raises `error` (if any); records whether it was cancelled."""

    def __init__(self, deltas: list[dict], error: Exception | None = None):
        self.deltas, self.error, self.cancelled = list(deltas), error, False

    async def __anext__(self) -> dict:
        if self.deltas:
            return self.deltas.pop(0)
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


def drain(stream: EngineStream) -> list[dict]:
    async def collect() -> list[dict]:
        return [d async for d in stream]

    return asyncio.run(collect())


def test_a_stream_lost_before_its_first_delta_is_opened_again():
    lost, answered = ScriptedGeneration([], RayActorError()), ScriptedGeneration([{"t": 1}, {"t": 2}])
    starts = iter([lost, answered])
    assert drain(EngineStream(lambda: next(starts), retries=2, rollout_id="r")) == [{"t": 1}, {"t": 2}]
    assert lost.cancelled and not answered.cancelled


def test_a_stream_lost_after_a_delta_fails_and_one_lost_every_time_stops_after_the_retries():
    starts = iter([ScriptedGeneration([{"t": 1}], RayActorError())])
    with pytest.raises(GatewayError):
        drain(EngineStream(lambda: next(starts), retries=2, rollout_id="r"))
    opened = []

    def always_lost() -> ScriptedGeneration:
        opened.append(ScriptedGeneration([], RayActorError()))
        return opened[-1]

    with pytest.raises(GatewayError, match="inference.request_retries"):
        drain(EngineStream(always_lost, retries=2, rollout_id="r"))
    assert len(opened) == 3  # the first attempt and two re-sends
