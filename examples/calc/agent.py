"""The calc agent: plain ``openai`` SDK, the ``<calc>`` tool protocol, strict answer reward.

Run it with ``lightning-ray rollout configs/calc.yaml --limit 8``. Every LLM call goes to ``llm.base_url``,
so lightning-ray records each turn with its token ids and log-probs; nothing here knows about training.
"""

from __future__ import annotations

import openai

import lightning_ray as lr
from examples.calc.prompt import SYSTEM_RULE
from examples.calc.protocol import Chat, run_episode
from examples.calc.reward import shaped_reward


def make_chat(client: openai.AsyncOpenAI, llm: lr.LLM) -> Chat:
    """One chat-completion call per turn with the run's sampling (temperature, top_p, max_tokens, top_k)."""

    async def chat(messages: list[dict[str, str]]) -> str:
        response = await client.chat.completions.create(
            model=llm.model, messages=messages, **llm.sampling_kwargs()
        )
        return response.choices[0].message.content or ""

    return chat


@lr.rollout
async def calc_agent(task: dict, llm: lr.LLM) -> float:
    """Solve one word problem with the calculator tool; 1.0 for the right ``<answer>``, partial credit for
    answer format and tool use otherwise (see ``shaped_reward``). The system prompt is the named prompt
    ``system``: ``SYSTEM_RULE`` unless the config's ``prompts.system`` (or ``lightning-ray optimize``) sets it."""
    system = llm.prompt("system", default=SYSTEM_RULE)
    client = openai.AsyncOpenAI(base_url=llm.base_url, api_key=llm.api_key)
    async with client:
        episode = await run_episode(task["question"], make_chat(client, llm), system)
    return shaped_reward(episode.final_reply, float(task["answer"]), episode.tool_calls)
