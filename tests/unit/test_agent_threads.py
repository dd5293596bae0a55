"""Agent code on a thread of its own (`lightning_ray.rollouts.isolation`), the capped per-rollout output, and the
classification of bad rewards and leaked threads. No Ray here: the end-to-end version, through a real worker,
is tests/integration/test_agent_isolation.py."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time

import openai
import pytest

import lightning_ray as lr
from lightning_ray.agent.rewards import BadReward, coerce_reward, open_reward_sink
from lightning_ray.monitor.errors import classify_outcome
from lightning_ray.rollouts import capture, isolation
from lightning_ray.rollouts.isolation import AgentThread, LeakedThreads, OutlivingThreads


def run(fn, *args, timeout: float = 5.0):
    """One agent call the way a worker makes it, inside a reward sink and output capture; returns (outcome,
    sink, logs)."""

    async def main():
        capture.install()
        with capture.captured() as out, open_reward_sink("r1") as sink:
            outcome = await AgentThread(fn, *args, name="agent-r1").wait(timeout)
        return outcome, sink, out.getvalue()

    return asyncio.run(main())


async def longest_stall(until: asyncio.Future) -> float:
    """How long the running loop was kept from a 10 ms tick at most, until `until` is done."""
    longest = 0.0
    while not until.done():
        t = time.perf_counter()
        await asyncio.sleep(0.01)
        longest = max(longest, time.perf_counter() - t - 0.01)
    return longest


async def async_agent(task, llm):
    await asyncio.sleep(0)
    lr.emit_reward(0.5)
    print("async says", task["x"])
    return threading.current_thread().name


def sync_agent(task, llm):
    lr.emit_reward(0.25)
    logging.getLogger("agent").warning("sync says %s", task["x"])
    return threading.current_thread().name


@pytest.mark.parametrize("agent", [async_agent, sync_agent])
def test_an_agent_runs_on_its_own_thread_with_its_rollouts_sink_and_capture(agent):
    outcome, sink, logs = run(agent, {"x": 7}, None)
    assert outcome.error is None and outcome.value == "agent-r1"
    assert len(sink.rewards) == 1
    assert "says 7" in logs


def test_openai_answers_first_parsed_on_many_agent_threads_at_once_all_parse():
    """openai builds its response models on first use (pydantic `defer_build`); agents run on threads of their
    own, so a fresh worker's first answers are parsed on several threads at once. Before pydantic 2.14 that
    build raced (pydantic#11849): one agent in ~8 CI runs failed with "BaseModel cannot be instantiated
    directly". Each round here is a fresh pair of openai models that 8 agents parse at the same moment, with
    the interpreter switching threads as often as it can; on pydantic 2.13.4 it failed 6 runs of 6."""
    rounds, agents = 200, 8
    models = []
    for k in range(rounds):
        token = type(f"Token{k}", (openai.BaseModel,), {"__annotations__": {"id": int, "logprob": float}})
        fields = {"tokens": list[token], "finish_reason": str | None}
        models.append(type(f"Choice{k}", (openai.BaseModel,), {"__annotations__": fields}))
    barriers = [threading.Barrier(agents) for _ in range(rounds)]
    answer = {"tokens": [{"id": 1, "logprob": -0.5}], "finish_reason": "length", "extra": {"x": 1}}

    def agent(i):
        errors = []
        for model, barrier in zip(models, barriers, strict=True):
            barrier.wait(timeout=10)
            try:
                model.construct(**answer)  # what openai does with every answer (`_models.construct_type`)
                model.model_validate(answer)
            except Exception as e:
                errors.append(repr(e)[:200])
        return errors

    async def main():
        return await asyncio.gather(
            *(AgentThread(agent, i, name=f"agent-{i}").wait(60) for i in range(agents))
        )

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        outcomes = asyncio.run(main())
    finally:
        sys.setswitchinterval(interval)
    assert [o.error for o in outcomes] == [None] * agents
    assert [e for o in outcomes for e in o.value] == []


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), asyncio.CancelledError()])
def test_base_exceptions_of_an_agent_are_its_outcome(exc):
    def sync(task, llm):
        raise exc

    async def coro(task, llm):
        raise exc

    for agent in (sync, coro):
        outcome, *_ = run(agent, {}, None)
        assert outcome.error is exc


def test_a_blocking_async_agent_times_out_without_stalling_the_callers_loop_and_is_counted_hung(monkeypatch):
    monkeypatch.setattr(isolation, "HUNG_AFTER_S", 0.2)
    release = threading.Event()

    async def blocker(task, llm):
        release.wait(10)  # blocks its own loop: cancel() cannot reach it before this returns
        await asyncio.sleep(10)  # ... and is cancelled here

    async def main():
        agent = AgentThread(blocker, {}, None, name="agent-blocker")
        waiting = asyncio.ensure_future(agent.wait(0.3))
        stall = await longest_stall(waiting)
        with pytest.raises(TimeoutError, match="agent-blocker"):
            await waiting
        agent.cancel()
        outliving = OutlivingThreads()
        outliving.add(agent.thread, "r1")
        await asyncio.sleep(0.3)
        hung = outliving.hung()
        release.set()
        outcome = await agent.wait(5)
        agent.thread.join(5)
        return stall, hung, outcome, outliving.hung()

    stall, hung, outcome, hung_after = asyncio.run(main())
    assert stall < 0.1  # the caller's loop (the gateway's, in a worker) kept running all along
    assert hung == ["'agent-blocker' of rollout r1"]
    assert isinstance(outcome.error, asyncio.CancelledError)  # the cancel landed at its next await
    assert hung_after == []


def test_threads_an_agent_leaves_running_are_reported_and_classified():
    stop = threading.Event()

    def leaker(task, llm):
        threading.Thread(target=stop.wait, name="poller", daemon=False).start()
        threading.Thread(target=time.sleep, args=(0.05,), daemon=False).start()  # ends within the grace
        threading.Thread(target=stop.wait, name="background", daemon=True).start()  # daemon: watched
        return 1.0

    try:
        outcome, *_ = run(leaker, {}, None)
    finally:
        stop.set()
    assert [t.name for t in outcome.leaked] == ["poller"]
    assert [t.name for t in outcome.lingering] == ["background"]  # not a failure; the worker watches it
    failure = classify_outcome(exception=LeakedThreads(outcome.leaked), reward=None)
    assert failure.kind == "leaked_threads" and "'poller' (target Event.wait)" in failure.message


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (float("nan"), "float: nan"),
        (float("-inf"), "float: -inf"),
        (10**400, "int: an integer of 1329 bits"),
        (2**1024, "does not fit a float, got int: an integer of 1025 bits"),
        ("0.5", "str: '0.5'"),
        ({"reward": 1}, "dict: {'reward': 1}"),
        ([0.0] * 1000, "... (5000 characters)"),
    ],
    ids=["nan", "-inf", "10**400", "2**1024", "str", "dict", "long-list"],
)
def test_bad_rewards_are_a_bad_reward_failure_naming_the_value(value, named):
    with pytest.raises(BadReward) as caught:
        coerce_reward(value)
    assert named in str(caught.value)
    failure = classify_outcome(exception=caught.value)
    assert (failure.kind, failure.status, failure.exc_type) == (
        "bad_reward",
        "failed",
        "lightning_ray.agent.rewards.BadReward",
    )


def test_a_bad_emitted_reward_wrapped_by_the_agent_is_still_a_bad_reward():
    with open_reward_sink("r"):
        try:
            lr.emit_reward(float("nan"))
        except ValueError as e:
            try:
                raise RuntimeError("agent gave up") from e
            except RuntimeError as wrapped:
                failure = classify_outcome(exception=wrapped)
    assert failure.kind == "bad_reward" and "nan" in failure.message


def test_captured_output_is_capped_whatever_the_size_of_the_writes():
    capture.install()
    with capture.captured() as out:
        print("x" * 5_000_000)
        for i in range(10_000):
            print(f"line {i}", file=sys.stderr)
            logging.getLogger("chatty").warning("warn %d", i)
    text = out.getvalue()
    assert text.startswith("xxx") and len(text) < capture.MAX_CHARS + 100
    assert text.endswith("more characters were not kept\n") and "\n[truncated] " in text
    assert out.dropped > 5_000_000 - capture.MAX_CHARS
    with capture.captured() as out:
        print("a", file=sys.stderr)
    assert out.getvalue() == "[stderr] a[stderr] \n"  # each write prefixed, as before the cap
