"""What rewards a live group's extra samples: a `module:function` reward function or an LLM judge.

Either is an async `Scorer(prompt, completion) -> float`: `prompt` is the rendered prompt text of the request,
`completion` the sampled text. A scorer that raises or answers no finite number fails that sample (`bad_reward`);
its group still trains on the others.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
from collections.abc import Awaitable, Callable

from lightning_ray.agent.api import AgentLoadError, _import_spec
from lightning_ray.config import ConfigError, LiveConfig

Scorer = Callable[[str, str], Awaitable[float]]
JUDGE_PROMPT = (
    "Rate how well the RESPONSE answers the PROMPT, from 0 (wrong or useless) to 1 (fully correct). "
    "Answer with the number only.\n\nPROMPT:\n{prompt}\n\nRESPONSE:\n{completion}"
)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def load_scorer(cfg: LiveConfig) -> Scorer | None:
    """The configured scorer (None when neither `live.scorer` nor `live.judge_url` is set)."""
    if cfg.judge_url is not None:
        return judge_scorer(cfg.judge_url, cfg.judge_model, cfg.judge_api_key)
    if cfg.scorer is None:
        return None
    try:
        fn = _import_spec(cfg.scorer)
    except AgentLoadError as e:
        raise ConfigError(f"live.scorer: {e}") from None
    if not callable(fn):
        raise ConfigError(f"live.scorer: {cfg.scorer!r} is not a function")

    async def score(prompt: str, completion: str) -> float:
        if inspect.iscoroutinefunction(fn):
            return await fn(prompt, completion)
        return await asyncio.to_thread(fn, prompt, completion)

    return score


def judge_scorer(url: str, model: str, api_key: str) -> Scorer:
    """An OpenAI-compatible judge asked for a 0..1 rating; its first number is the reward, clipped to 0..1."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key=api_key, max_retries=1)

    async def score(prompt: str, completion: str) -> float:
        answer = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": JUDGE_PROMPT.format(prompt=prompt, completion=completion)}],
            temperature=0.0,
            max_tokens=16,
        )
        return judge_rating(answer.choices[0].message.content or "")

    return score


def judge_rating(text: str) -> float:
    """The first number in a judge's answer, clipped to 0..1; an answer without one is a `ValueError`."""
    found = NUMBER.search(text)
    if found is None:
        raise ValueError(f"the judge answered no number: {text[:80]!r}")
    value = float(found.group())
    return min(1.0, max(0.0, value)) if math.isfinite(value) else 0.0
