"""Agents used by the benchmarks (imported by rollout workers as `benchmarks.agents:<name>`)."""

from __future__ import annotations

import openai

import lightning_ray as lr


@lr.rollout
async def trivial_agent(task: dict, llm: lr.LLM) -> float:
    """One short chat call, then a reward: measures the machinery around an LLM call, not the agent."""
    client = openai.AsyncOpenAI(base_url=llm.base_url, api_key=llm.api_key, max_retries=0)
    async with client:
        reply = await client.chat.completions.create(
            model=llm.model,
            messages=[{"role": "user", "content": task["question"]}],
            **llm.sampling_kwargs(),
        )
    return float(bool(reply.choices[0].message.content))
