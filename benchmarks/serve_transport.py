"""What a Serve handle call costs the caller and the replica: Ray actor calls (Serve's default) vs Serve's gRPC
channel (`_by_reference=False`, what the gateway uses: `lightning_ray.gateway.engine.over_grpc`).

    python -m benchmarks.serve_transport [--calls 400] [--concurrency 16]

One deployment with the inference deployment's request router (sticky sessions) whose method answers at once
with what `InferenceServer.generate` returns for a 16-token answer, so everything measured is transport. The
two transports run in alternating rounds (background load hits both alike): sequential calls, then
`--concurrency` in flight. Caller CPU is this process (the handle, its router thread); replica CPU the replica's
process. Prints and writes benchmarks/results/serve_transport.json with the gRPC/actor ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import psutil
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from benchmarks.gateway_overhead import cpu_seconds, load_avg
from lightning_ray.gateway.engine import over_grpc
from lightning_ray.inference.server import STICKY_ROUTER

ANSWER = {
    "response_ids": list(range(16)),
    "response_logprobs": [-0.5] * 16,
    "response_versions": [3] * 16,
    "finish_reason": "length",
    "policy_version": 3,
    "replica": "0123abcd",
}


@serve.deployment(
    max_ongoing_requests=128,
    ray_actor_options={"num_cpus": 0.1},
    request_router_config=RequestRouterConfig(request_router_class=STICKY_ROUTER),
)
class Answerer:
    def pid(self) -> int:
        return os.getpid()

    async def generate(self, prompt_ids: list[int], sampling: dict) -> dict:
        return {**ANSWER, "prompt_ids": prompt_ids}


async def measure(handle, replica: psutil.Process, calls: int, concurrency: int) -> dict[str, float]:
    """Latency p50, calls/s and CPU per call of `calls` calls, `concurrency` in flight, 16 sticky sessions."""
    gate, latencies, prompt = asyncio.Semaphore(concurrency), [], list(range(40))

    async def one(i: int) -> None:
        async with gate:
            t0 = time.perf_counter()
            await handle.options(session_id=f"rollout-{i % 16}").generate.remote(prompt, {"temperature": 1.0})
            latencies.append(time.perf_counter() - t0)

    t0, (caller0, replica0) = time.perf_counter(), cpu_seconds([replica])
    await asyncio.gather(*(one(i) for i in range(calls)))
    wall, (caller1, replica1) = time.perf_counter() - t0, cpu_seconds([replica])
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "calls_per_s": calls / wall,
        "caller_cpu_ms": (caller1 - caller0) / calls * 1000,
        "replica_cpu_ms": (replica1 - replica0) / calls * 1000,
    }


def mean_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.mean(r[k] for r in rounds), 3) for k in rounds[0]}


async def run(handle, args) -> dict:
    paths = {"actor": handle, "grpc": over_grpc(handle)}
    replica = psutil.Process(await handle.pid.remote())
    for h in paths.values():  # warm both channels and the router
        await measure(h, replica, 50, args.concurrency)
    out: dict = {}
    for phase, concurrency in (("sequential", 1), (f"concurrent_{args.concurrency}", args.concurrency)):
        rounds: dict[str, list] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, h in paths.items():
                rounds[name].append(await measure(h, replica, args.calls // args.rounds, concurrency))
        section = {name: mean_of(r) for name, r in rounds.items()}
        section["grpc_over_actor"] = {
            k: round(section["grpc"][k] / section["actor"][k], 3) for k in section["actor"]
        }
        section["load_avg_1m_at_end"] = load_avg()
        out[phase] = section
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="calls per transport and phase")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds the calls are split into")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    load_before = load_avg()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        handle = serve.run(Answerer.bind(), name="serve-transport", route_prefix=None)
        result = asyncio.run(run(handle, args))
    finally:
        serve.shutdown()
        ray.shutdown()
    result.update(
        ray_version=ray.__version__,
        machine=f"{os.cpu_count()} CPU cores",
        load_avg_1m_before_after=[load_before, load_avg()],
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command=f"python -m benchmarks.serve_transport --calls {args.calls} --rounds {args.rounds} "
        f"--concurrency {args.concurrency}",
    )
    print(json.dumps(result, indent=1))
    out = Path(__file__).parent / "results" / "serve_transport.json"
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
