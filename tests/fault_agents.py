"""Agents that break what runs them, for the fault tests of whole runs (tests/integration/test_train_faults.py)."""

from __future__ import annotations

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
def never_returns(task: dict, llm: lr.LLM) -> float:
    """A sync agent stuck for good, before its first LLM call: nothing in the run progresses."""
    time.sleep(3600)
    return 0.0
