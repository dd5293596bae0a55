"""The calc agent with a slow, long-tailed environment: the agent of `benchmarks/async_pipeline.py`.

    rollout.agent=benchmarks.slow_tool_agent:slow_calc_agent

It is `examples/calc` (same prompt, same `<calc>` protocol, same `shaped_reward`, same dataset), talking to
`llm.base_url` through the OpenAI SDK, except that every environment step waits on I/O first: after each model
reply the agent "sends it to a remote sandbox" (the calculator when the reply calls `<calc>`, the grader when
it answers or does neither) and waits for the sandbox before it goes on. The wait is an `asyncio.sleep` (no
CPU) drawn from a lognormal distribution: median 1 s, sigma 1.0 by default, so p90 ~3.6 s, p99 ~10.2 s, mean
~1.65 s, capped at 60 s. A rollout therefore waits at least once (one LLM call), at most 1 + `MAX_TOOL_CALLS`
times; the untrained SmolLM2 seldom calls the tool, which is why the final step waits too.

Settings come from environment variables, read at each rollout (the rollout workers of a local Ray cluster
inherit the environment of the process that started it, so set them before `lightning-ray train`):

    LR_BENCH_TOOL_MEDIAN_S  median wait in seconds (1.0)
    LR_BENCH_TOOL_SIGMA     sigma of the wait's log (1.0)
    LR_BENCH_TOOL_MAX_S     cap in seconds (60)
    LR_BENCH_TOOL_SEED      seed (0): the i-th rollout of a task in a worker process draws the same waits in
                            every run, so the synchronous and asynchronous runs wait alike on the same tasks
    LR_BENCH_TOOL_LOG       a file: one JSON line per rollout with the waits it drew (unset: no log)

`python -m benchmarks.slow_tool_agent` checks the sampler and runs one episode against a scripted fake LLM
(no Ray, no model); it prints the configured quantiles next to sampled ones.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from statistics import NormalDist

import openai

import lightning_ray as lr
from examples.calc.agent import make_chat
from examples.calc.protocol import Chat, Episode, record_reply, start_episode
from examples.calc.reward import shaped_reward

QUANTILES = (0.5, 0.9, 0.99, 0.999)


@dataclass(frozen=True)
class ToolLatency:
    """Lognormal waits: log(wait) ~ Normal(log(median_s), sigma), capped at max_s."""

    median_s: float = 1.0
    sigma: float = 1.0
    max_s: float = 60.0
    seed: int = 0

    @classmethod
    def from_env(cls) -> ToolLatency:
        env = os.environ.get
        return cls(
            median_s=float(env("LR_BENCH_TOOL_MEDIAN_S", cls.median_s)),
            sigma=float(env("LR_BENCH_TOOL_SIGMA", cls.sigma)),
            max_s=float(env("LR_BENCH_TOOL_MAX_S", cls.max_s)),
            seed=int(env("LR_BENCH_TOOL_SEED", cls.seed)),
        )

    def env(self) -> dict[str, str]:
        """The environment variables that configure this latency in the rollout workers."""
        return {
            "LR_BENCH_TOOL_MEDIAN_S": repr(self.median_s),
            "LR_BENCH_TOOL_SIGMA": repr(self.sigma),
            "LR_BENCH_TOOL_MAX_S": repr(self.max_s),
            "LR_BENCH_TOOL_SEED": str(self.seed),
        }

    def rng(self, key: str) -> random.Random:
        """A generator for `key` alone (a string seed is hashed with SHA-512: the same in every process)."""
        return random.Random(f"{self.seed}:{key}")

    def draw(self, rng: random.Random) -> float:
        return min(rng.lognormvariate(math.log(self.median_s), self.sigma), self.max_s)

    def quantile(self, q: float) -> float:
        """The configured distribution's q-quantile (the cap included)."""
        return min(self.median_s * math.exp(self.sigma * NormalDist().inv_cdf(q)), self.max_s)

    def describe(self) -> dict[str, float]:
        """Configured quantiles and mean (the mean ignores the cap: < 0.1% off at the defaults)."""
        out = {f"p{q * 100:g}_s": round(self.quantile(q), 3) for q in QUANTILES}
        out["mean_s"] = round(self.median_s * math.exp(self.sigma**2 / 2), 3)
        return out


def summarize_waits(waits: list[float]) -> dict[str, float]:
    """Empirical quantiles of `waits` (nearest rank), their mean, count and largest value."""
    if not waits:
        return {"n": 0}
    ordered = sorted(waits)
    out: dict[str, float] = {"n": len(ordered)}
    for q in QUANTILES:
        out[f"p{q * 100:g}_s"] = round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 3)
    out["mean_s"] = round(statistics.fmean(ordered), 3)
    out["max_s"] = round(ordered[-1], 3)
    return out


@dataclass
class SlowEpisode:
    episode: Episode
    waits: list[float] = field(default_factory=list)


_seen: Counter[str] = Counter()  # rollouts of each task started in this process


def rollout_key(task: dict) -> str:
    """`<task id>#<i>`: the i-th rollout of this task in this process (a group's samples get 0..n-1)."""
    task_id = str(task.get("id", task.get("question", "")))
    i = _seen[task_id]
    _seen[task_id] += 1
    return f"{task_id}#{i}"


async def run_slow_episode(question: str, chat: Chat, latency: ToolLatency, key: str) -> SlowEpisode:
    """`examples.calc.protocol.run_episode`, with a wait on the environment after every model reply."""
    rng = latency.rng(key)
    out = SlowEpisode(start_episode(question))
    done = False
    while not done:
        reply = await chat(out.episode.messages)
        wait = latency.draw(rng)
        await asyncio.sleep(wait)  # the sandbox runs the calculator (or grades the answer): I/O, no CPU
        out.waits.append(wait)
        done = record_reply(out.episode, reply)
    return out


def log_waits(key: str, waits: list[float], tool_calls: int) -> None:
    path = os.environ.get("LR_BENCH_TOOL_LOG")
    if not path:
        return
    line = {"key": key, "waits": [round(w, 4) for w in waits], "tool_calls": tool_calls, "t": time.time()}
    with open(path, "a") as f:  # one short append per rollout
        f.write(json.dumps(line) + "\n")


@lr.rollout
async def slow_calc_agent(task: dict, llm: lr.LLM) -> float:
    """Solve one calc word problem like `examples.calc.agent:calc_agent`, waiting on a slow environment after
    each model reply; 1.0 for the right `<answer>`, partial credit otherwise (`shaped_reward`)."""
    latency, key = ToolLatency.from_env(), rollout_key(task)
    client = openai.AsyncOpenAI(base_url=llm.base_url, api_key=llm.api_key)
    async with client:
        result = await run_slow_episode(task["question"], make_chat(client, llm), latency, key)
    episode = result.episode
    log_waits(key, result.waits, episode.tool_calls)
    return shaped_reward(episode.final_reply, float(task["answer"]), episode.tool_calls)


# ------------------------------------------------------------------------------------------ self-check


def scripted_chat(replies: list[str]) -> Chat:
    """A fake LLM that answers with `replies` in turn."""
    it = iter(replies)

    async def chat(messages: list[dict[str, str]]) -> str:
        return next(it)

    return chat


async def _check_episode() -> None:
    fast = ToolLatency(median_s=0.01, sigma=0.5)
    replies = ["<calc>8*8+10</calc>", "<answer>74</answer>"]
    t0 = time.perf_counter()
    result = await run_slow_episode("Max buys 8 packs...", scripted_chat(replies), fast, "calc-train-0000#0")
    took = time.perf_counter() - t0
    again = await run_slow_episode("Max buys 8 packs...", scripted_chat(replies), fast, "calc-train-0000#0")
    assert result.episode.tool_calls == 1 and result.episode.messages[-2]["content"] == "Result: 74"
    assert shaped_reward(result.episode.final_reply, 74.0, result.episode.tool_calls) == 1.0
    assert len(result.waits) == 2 and result.waits == again.waits, "the same key must draw the same waits"
    assert took >= sum(result.waits), "the waits must be slept"
    print(f"fake episode: 2 replies, 1 tool call, reward 1.0, waits {[round(w, 4) for w in result.waits]}")


def main() -> None:
    latency = ToolLatency.from_env()
    rng = latency.rng("self-check")
    sample = [latency.draw(rng) for _ in range(100_000)]
    print(
        f"tool latency: lognormal median {latency.median_s} s, sigma {latency.sigma}, cap {latency.max_s} s"
    )
    print(f"  configured: {latency.describe()}")
    print(f"  sampled:    {summarize_waits(sample)}")
    keys = [rollout_key({"id": "t"}) for _ in range(3)]
    assert keys == ["t#0", "t#1", "t#2"], keys
    per_group = [max(latency.draw(latency.rng(f"g{g}#{i}")) for i in range(24)) for g in range(2000)]
    print(
        f"  slowest of 24 rollouts x 1 wait (a synchronous step's barrier): median "
        f"{statistics.median(per_group):.1f} s, p90 {sorted(per_group)[1800]:.1f} s"
    )
    asyncio.run(_check_episode())
    print("ok")


if __name__ == "__main__":
    main()
