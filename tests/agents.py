"""Agents used by the integration tests. Each task's `mode` picks an ending, so one batch covers every kind."""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import threading
import time
from typing import Any

import openai

import lightning_ray as lr

log = logging.getLogger("scripted_agent")


async def _ask(llm: lr.LLM, text: str) -> str:
    client = openai.AsyncOpenAI(base_url=llm.base_url, api_key=llm.api_key, max_retries=0)
    reply = await client.chat.completions.create(
        model=llm.model, messages=[{"role": "user", "content": text}], **llm.sampling_kwargs()
    )
    return reply.choices[0].message.content or ""


@lr.rollout
async def scripted_agent(task: dict, llm: lr.LLM) -> float | None:
    mode = task["mode"]
    await _ask(llm, task["question"])
    print(f"asked {task['question']}")
    log.warning("mode is %s", mode)
    if mode == "raise":
        raise ValueError(f"bad input {task['id']}")
    if mode == "sleep":
        await asyncio.sleep(60)
    if mode == "none":
        return None
    if mode == "emit":
        lr.emit_reward(0.25, format=1.0)
        await _ask(llm, "and again?")
        thread = threading.Thread(target=lr.emit_reward, args=(0.5,), kwargs={"correct": 1.0})
        thread.start()
        thread.join()
        print("emitted from a thread", file=sys.stderr)
        return None
    return float(len(task["question"]) % 2)


@lr.rollout
def sync_agent(task: dict, llm: lr.LLM) -> float:
    client = openai.OpenAI(base_url=llm.base_url, api_key=llm.api_key, max_retries=0)
    reply = client.chat.completions.create(
        model=llm.model, messages=[{"role": "user", "content": task["question"]}], **llm.sampling_kwargs()
    )
    print("sync agent got", len(reply.choices[0].message.content or ""), "chars")
    return 1.0


@lr.rollout
async def slow_agent(task: dict, llm: lr.LLM) -> float:
    await _ask(llm, task["question"])
    await asyncio.sleep(1.0)
    return 1.0


@lr.rollout
async def varied_agent(task: dict, llm: lr.LLM) -> float:
    """One call; a reward that differs between samples of the same task, so GRPO groups have variance."""
    reply = await _ask(llm, task["question"])
    return float(len(reply) % 3 == 0)


@lr.rollout
async def chatty_agent(task: dict, llm: lr.LLM) -> float:
    """Three calls in one growing conversation with a tool-like user turn after each reply: turns that extend
    a prefix, for `algorithm.merge_prefix_turns`."""
    client = openai.AsyncOpenAI(base_url=llm.base_url, api_key=llm.api_key, max_retries=0)
    messages = [{"role": "user", "content": task["question"]}]
    for turn in range(3):
        reply = await client.chat.completions.create(
            model=llm.model, messages=messages, **llm.sampling_kwargs()
        )
        text = reply.choices[0].message.content or ""
        messages += [
            {"role": "assistant", "content": text},
            {"role": "user", "content": f"Result {turn}: 42"},
        ]
    return float(len(text) % 3 == 0)


@lr.rollout
async def waiting_agent(task: dict, llm: lr.LLM) -> float:
    """A call, a tool that waits a random 0-1.5 s on "I/O" (no CPU), another call: rollouts that finish out
    of order and overlap a learner step, for the asynchronous pipeline."""
    first = await _ask(llm, task["question"])
    await asyncio.sleep(random.uniform(0.0, 1.5))
    second = await _ask(llm, "and then?")
    return float((len(first) + len(second)) % 3 == 0)


BAD_REWARDS = {
    "nan": float("nan"),
    "inf": float("inf"),
    "overflow": 10**400,
    "string": "0.5",
    "dict": {"reward": 1.0},
}


def _linger() -> None:
    time.sleep(3.0)


@lr.rollout
async def faulty_agent(task: dict, llm: lr.LLM) -> Any:
    """One call, then the ending the task's `mode` picks: every way an agent can misbehave, for isolation tests.

    "block" stalls its own event loop far past any rollout timeout; "late" makes its call only after a delay,
    while a "block" rollout of the same worker is stalled."""
    mode = task["mode"]
    if mode == "late":
        await asyncio.sleep(task.get("delay_s", 2.0))
    await _ask(llm, task["question"])
    if mode == "block":
        time.sleep(30)
    if mode == "exit":
        sys.exit(3)
    if mode == "interrupt":
        raise KeyboardInterrupt
    if mode == "huge_print":
        print("x" * 200_000_000)
    if mode == "many_prints":
        for i in range(20_000):
            print(f"line {i} of a chatty agent")
            log.warning("log %d", i)
    if mode in BAD_REWARDS:
        return BAD_REWARDS[mode]
    if mode == "leak":
        threading.Thread(target=_linger, name=f"leaked-by-{task['id']}", daemon=False).start()
    return 1.0


@lr.rollout
def hanging_sync_agent(task: dict, llm: lr.LLM) -> float:
    """A sync agent: "hang" never returns (a wait nothing ends), "exit" raises SystemExit, else one call."""
    if task["mode"] == "hang":
        threading.Event().wait()
    if task["mode"] == "exit":
        raise SystemExit("agent quit")
    return sync_agent(task, llm)
