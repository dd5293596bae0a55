"""Agents that break what runs them, for the fault tests of whole runs (tests/integration/test_train_faults.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import lightning_ray as lr
from tests.agents import varied_agent


@lr.rollout
async def kills_its_worker_once(task: dict, llm: lr.LLM) -> float:
    """A real rollout; the first one to run (the task's `kill_marker` file does not exist yet) then kills the
    rollout worker's process with SIGKILL, every rollout running there with it."""
    reward = await varied_agent(task, llm)
    marker = Path(task["kill_marker"])
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return reward
    os.kill(os.getpid(), signal.SIGKILL)
    return reward


@lr.rollout
async def always_fails(task: dict, llm: lr.LLM) -> float:
    """A real rollout (one LLM call, a line of output) that then raises: every rollout fails, `agent_exception`."""
    await varied_agent(task, llm)
    print(f"about to fail on {task['id']}")
    raise ValueError(f"always fails: {task['id']}")


@lr.rollout
def never_returns(task: dict, llm: lr.LLM) -> float:
    """A sync agent stuck for good, before its first LLM call: nothing in the run progresses."""
    time.sleep(3600)
    return 0.0


@lr.rollout
async def holds_the_last_rollout_of_each_group(task: dict, llm: lr.LLM) -> float:
    """`varied_agent`; the task's `group_size`-th rollout to start (counted by files claimed under the task's
    `gate` folder) then waits for `gate/open` (at most 120 s): its group keeps running with every other rollout
    finished. Rollouts that start later (a resume's) do not wait."""
    gate = Path(task["gate"])
    n = 0
    while True:
        try:
            (gate / f"{task['id']}-{n}").touch(exist_ok=False)
            break
        except FileExistsError:
            n += 1
    reward = await varied_agent(task, llm)
    deadline = time.monotonic() + 120
    while n == task["group_size"] - 1 and not (gate / "open").exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return reward
