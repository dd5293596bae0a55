"""Agents for the remote runner tests (`lightning-ray runner URL --agent tests.runner_agents:...`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning_ray as lr
from tests.agents import waiting_agent


@lr.rollout
async def remote_agent(task: dict, llm: lr.LLM) -> float:
    """`waiting_agent`, except in a runner started with $STUCK_MARKER: there it notes that it holds a rollout
    (the file), then never finishes, so the test can kill the runner mid-rollout."""
    marker = os.environ.get("STUCK_MARKER")
    if marker:
        Path(marker).write_text(task["id"])
        time.sleep(3600)
    return await waiting_agent(task, llm)


@lr.rollout
def emitting_agent(task: dict, llm: lr.LLM) -> None:
    """One call, then an emitted reward credited to it (and none returned)."""
    import openai

    client = openai.OpenAI(base_url=llm.base_url, api_key=llm.api_key, max_retries=0)
    client.chat.completions.create(
        model=llm.model, messages=[{"role": "user", "content": task["question"]}], **llm.sampling_kwargs()
    )
    print("called once")
    lr.emit_reward(0.75, correct=1.0)
