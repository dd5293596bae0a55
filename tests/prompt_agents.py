"""An agent for `lightning-ray optimize`'s integration test: its reward depends on the prompt it reads."""

from __future__ import annotations

import lightning_ray as lr
from tests.agents import _ask


@lr.rollout
async def prompt_length_agent(task: dict, llm: lr.LLM) -> float:
    """One call under the system prompt; the reward is the prompt's length in words over `task["words"]`
    (capped at 0.9, so no rollout succeeds and every minibatch has failures to critique)."""
    system = llm.prompt("system", default="Answer.")
    await _ask(llm, f"{system}\n{task['question']}")
    return min(0.9, len(system.split()) / task["words"])
