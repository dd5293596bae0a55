"""Gateway overhead per LLM call: the engine through its Ray Serve handle vs the same request through the gateway.

    python -m benchmarks.gateway_overhead [--calls 200] [--concurrency 16] [--tokens 16] [--model builtin:...]

(a) `direct` awaits the gateway's own engine call with token ids (`gw.state.engine`, a `gateway.engine.Engine`:
the handle, sticky per rollout, over Serve's gRPC channel).
(b) `gateway` sends the same chat request (same prompt ids, max_tokens, greedy) with the official
`openai.AsyncOpenAI` client to `/rollout/{id}/v1/chat/completions`: HTTP, validation, render, the engine call,
recording, the response body and the client's own parsing.
(c) `client_floor`: the same client and request against a uvicorn server in the same loop that answers at once
with the gateway's body: what the client costs against any OpenAI-compatible server. The overhead's
`p50_beyond_client_floor_ms` is (b) - (a) - (c) at the p50.
(d) `vllm_openai`, the peer: the same client and request, asking for log-probs and token ids, to vLLM's own
OpenAI server with the deployment's engine settings (`vllm_openai_server.py`): an agent pointed at vLLM with no
gateway and no Serve. `gateway_vs_vllm_openai` compares (b) with (d).

The gateway is a sidecar in the caller's event loop, as in a RolloutWorker. The default model is a tiny random
one, so that the overhead is visible. Sequential calls rotate the paths' order so that background load hits all
alike; the concurrent run keeps `--concurrency` calls in flight, one path at a time. Prints and writes
benchmarks/results/gateway_overhead[_<model>][_tokens<N>].json (`--tokens 1` leaves the engine little to do, so
the sequential differences stand out of its noise): p50/p99 per path, differences, ratios, the load average after
each phase, and whether every recorded prompt's ids equal a render + tokenize from scratch.

CPU per call (other users' load does not enter it): `driver` is this process (client, sidecar gateway, Serve
handle), `engine` the Ray processes this run started (vLLM, its replica, Serve), for (d) vLLM's server and its
engine. A last phase sends the concurrent calls through a gateway on a thread of its own, whose CPU clock is
the gateway's own CPU per call (HTTP server, routing, render, record, its side of the handle call).
`cpu_breakdown` splits the gateway path's extra CPU per call into the client floor's (client and HTTP hop), the
gateway's own beyond it and the engine's extra, the first two also as shares of the direct call's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.gateway_overhead_stats import cpu_breakdown, overhead, stats_ms
from benchmarks.vllm_openai_server import start_vllm_openai, stop_vllm_openai

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTION = "What is the capital of France?"


def load_avg() -> float:
    """The 1-minute load average: other work on this 2-core box shows up here, next to the numbers."""
    return round(os.getloadavg()[0], 2)


def cpu_seconds(engine: list) -> tuple[float, float]:
    """(CPU seconds of this process, of the engine's processes) so far."""
    total = 0.0
    for proc in engine:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return time.process_time(), total


async def start_floor_server(gw, rollout_id: str, messages: list, max_tokens: int):
    """Path (c), the client's floor: an HTTP server on the gateway's HTTP stack (uvicorn, in this event loop)
    whose every answer is the body the gateway gave this request, sent at once (no routing, render, engine or
    record). Returns (server, its serving task, base URL)."""
    import httpx
    import uvicorn

    request = {"model": gw.served_model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {gw.api_key}"}) as http:
        answer = await http.post(f"{gw.base_url(rollout_id)}/chat/completions", json=request)
    answer.raise_for_status()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer.content)).encode())]

    async def app(scope, receive, send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer.content})

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # IPPROTO_TCP: NODELAY
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


async def bench(args: argparse.Namespace, handle, cfg, peer: psutil.Process, peer_url: str) -> dict:
    import openai

    from lightning_ray.gateway import start_gateway, start_gateway_thread
    from lightning_ray.gateway.render import decode, encode, render_chat

    # The Ray processes this run started (engine, replica, Serve): ray.init made them children of this one, as
    # start_vllm_openai made the peer's server, which is counted apart.
    peer_tree = [peer, *peer.children(recursive=True)]
    engine = [p for p in psutil.Process().children(recursive=True) if p not in peer_tree]
    gw = await start_gateway(cfg, handle=handle)
    messages = [{"role": "user", "content": QUESTION}]
    sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_tokens": args.tokens}
    n_clients = max(1, args.concurrency)
    rollout_ids = [f"bench-{i}-{os.urandom(8).hex()}" for i in range(n_clients)]

    def openai_clients(gateway) -> list:
        for rid in rollout_ids:
            gateway.open_rollout(rid)
        return [
            openai.AsyncOpenAI(base_url=gateway.base_url(rid), api_key=gateway.api_key, max_retries=0)
            for rid in rollout_ids
        ]

    clients = openai_clients(gw)

    async def chat(client, **extra):
        """The request every OpenAI-client path sends."""
        return await client.chat.completions.create(
            model=gw.served_model, messages=messages, max_tokens=args.tokens, temperature=0.0, **extra
        )

    async def via_gateway(i: int, through: list | None = None, **extra) -> tuple[float, int]:
        t0 = time.perf_counter()
        reply = await chat((through or clients)[i], **extra)
        return time.perf_counter() - t0, reply.usage.completion_tokens

    # One gateway call tells us exactly the prompt ids the engine sees, so path (a) sends the same request.
    await via_gateway(0)
    prompt_ids = gw.transitions(rollout_ids[0])[-1].prompt_ids

    async def direct(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        out = await gw.state.engine.generate(rollout_ids[i], prompt_ids, sampling)
        return time.perf_counter() - t0, len(out["response_ids"])

    floor_server, floor_task, floor_url = await start_floor_server(gw, rollout_ids[0], messages, args.tokens)
    floor_clients = [
        openai.AsyncOpenAI(base_url=floor_url, api_key=gw.api_key, max_retries=0) for _ in rollout_ids
    ]

    def client_floor(i: int):
        return via_gateway(i, floor_clients)  # the same call, to the floor server

    peer_clients = [
        openai.AsyncOpenAI(base_url=peer_url, api_key="EMPTY", max_retries=0) for _ in rollout_ids
    ]

    # What training needs and the gateway records, asked of vLLM's own server: the sampled tokens' log-probs
    # and the token ids (as a proxy in front of vLLM, e.g. Agent Lightning's, asks).
    peer_extra = {"logprobs": True, "extra_body": {"return_token_ids": True}}

    def vllm_openai(i: int):
        return via_gateway(i, peer_clients, **peer_extra)  # the same call, to vLLM's own server

    peer_reply = await chat(peer_clients[0], **peer_extra)
    paths = [
        ("direct", direct),
        ("gateway", via_gateway),
        ("client_floor", client_floor),
        ("vllm_openai", vllm_openai),
    ]
    for _ in range(args.warmup):
        for _, fn in paths:
            await fn(0)

    seq: dict[str, list[tuple[float, int]]] = {name: [] for name, _ in paths}
    seq_cpu = dict.fromkeys(seq, 0.0)
    for k in range(args.calls):
        for name, fn in paths[k % len(paths) :] + paths[: k % len(paths)]:  # each path in each place in turn
            c0 = time.process_time()
            seq[name].append(await fn(0))
            seq_cpu[name] += time.process_time() - c0
    seq_load = load_avg()

    async def closed_loop(fn, total: int) -> tuple[list[tuple[float, int]], float]:
        """`n_clients` callers, each issuing calls back to back until `total` calls are done."""
        results: list[tuple[float, int]] = []
        counter = iter(range(total))

        async def caller(i: int) -> None:
            for _ in counter:
                results.append(await fn(i))

        t0 = time.perf_counter()
        await asyncio.gather(*[caller(i) for i in range(n_clients)])
        return results, time.perf_counter() - t0

    conc: dict[str, tuple[list[tuple[float, int]], float]] = {}
    measured = [
        ("direct", direct, engine),
        ("gateway", via_gateway, engine),
        ("vllm_openai", vllm_openai, peer_tree),
    ]
    cpu = {name: [0.0, 0.0] for name, _, _ in measured}  # [driver, engine] CPU seconds
    total = args.concurrent_calls
    for _, fn, _ in measured:
        await closed_loop(fn, n_clients)  # warm the batch path
    # Two rounds per path, alternating, pooled.
    for name, fn, procs in measured * 2:
        before = cpu_seconds(procs)
        res, wall = await closed_loop(fn, total // 2)
        cpu[name] = [acc + b - a for acc, a, b in zip(cpu[name], before, cpu_seconds(procs), strict=True)]
        prev_res, prev_wall = conc.get(name, ([], 0.0))
        conc[name] = (prev_res + res, prev_wall + wall)
    c0 = time.process_time()
    floor_res, floor_wall = await closed_loop(client_floor, total // 2)
    floor_cpu = time.process_time() - c0
    conc_load = load_avg()

    recorded = [t for rid in rollout_ids for t in gw.close_rollout(rid)]
    # The gateway's own CPU: the same calls through a gateway on a thread of its own, timed by its CPU clock.
    gw_thread = await asyncio.to_thread(start_gateway_thread, cfg, handle=handle)
    thread_clients = openai_clients(gw_thread)
    clock = time.pthread_getcpuclockid(gw_thread._thread.ident)
    await closed_loop(lambda i: via_gateway(i, thread_clients), n_clients)
    own0, before = time.clock_gettime(clock), cpu_seconds(engine)
    await closed_loop(lambda i: via_gateway(i, thread_clients), total // 2)
    own_s, after = time.clock_gettime(clock) - own0, cpu_seconds(engine)
    recorded += [t for rid in rollout_ids for t in gw_thread.close_rollout(rid)]
    for c in thread_clients:
        await c.close()
    await asyncio.to_thread(gw_thread.stop_sync)
    # The ids the gateway recorded, against a render + tokenize from scratch (none of the gateway's caches).
    tok = gw.state.tokenizer
    fresh_ids = encode(tok, render_chat(tok, messages, chat_template=gw.state.chat_template))
    exact = all(t.prompt_ids == fresh_ids for t in recorded) and all(
        t.response_text == decode(tok, t.response_ids) for t in recorded
    )
    for c in clients + floor_clients + peer_clients:
        await c.close()
    floor_server.should_exit = True
    await floor_task
    await gw.stop()

    def path_stats(rows: list[tuple[float, int]], wall: float | None = None) -> dict:
        out = {
            "calls": len(rows),
            **stats_ms([r[0] for r in rows]),
            "mean_response_tokens": round(statistics.fmean(r[1] for r in rows), 1),
        }
        if wall is not None:
            out["calls_per_s"] = round(len(rows) / wall, 1)
        return out

    def section(results: dict[str, list[tuple[float, int]]], walls: dict[str, float] | None = None) -> dict:
        out = {name: path_stats(rows, walls[name] if walls else None) for name, rows in results.items()}
        out["overhead"] = overhead(out["direct"], out["gateway"])
        out["gateway_vs_vllm_openai"] = overhead(out["vllm_openai"], out["gateway"])
        if walls:
            for key, base in (("overhead", "direct"), ("gateway_vs_vllm_openai", "vllm_openai")):
                out[key]["throughput_ratio"] = round(
                    out["gateway"]["calls_per_s"] / out[base]["calls_per_s"], 3
                )
        return out

    def floor(rows: list[tuple[float, int]], seconds_cpu: float, wall: float | None = None) -> dict:
        return {**path_stats(rows, wall), "driver_cpu_ms_per_call": ms_per_call(seconds_cpu, len(rows))}

    def ms_per_call(seconds: float, calls: int) -> float:
        return round(1000 * seconds / calls, 3)

    conc_calls = len(conc["direct"][0])
    thread_calls = total // 2
    cpu_ms = {
        k: {"driver": ms_per_call(d, conc_calls), "engine": ms_per_call(e, conc_calls)}
        for k, (d, e) in cpu.items()
    }
    conc_floor = floor(floor_res, floor_cpu, floor_wall)
    sequential = section({k: seq[k] for k in ("direct", "gateway", "vllm_openai")})
    sequential["client_floor"] = floor(seq["client_floor"], seq_cpu.pop("client_floor"))
    sequential["overhead"]["p50_beyond_client_floor_ms"] = round(
        sequential["overhead"]["p50_diff_ms"] - sequential["client_floor"]["p50_ms"], 2
    )
    return {
        "prompt_tokens": len(prompt_ids),
        "vllm_openai_same_prompt_ids": peer_reply.model_extra.get("prompt_token_ids") == prompt_ids,
        "gateway_calls_recorded": len(recorded),
        "recorded_ids_exact": exact,
        "sequential": {
            **sequential,
            "driver_cpu_ms_per_call": {k: ms_per_call(v, args.calls) for k, v in seq_cpu.items()},
            "load_avg_1m_at_end": seq_load,
        },
        f"concurrent_{n_clients}": {
            **section({k: v[0] for k, v in conc.items()}, walls={k: v[1] for k, v in conc.items()}),
            "cpu_ms_per_call": cpu_ms,
            "cpu_breakdown": cpu_breakdown(cpu_ms, conc_floor["driver_cpu_ms_per_call"]),
            "gateway_thread": {
                "calls": thread_calls,
                "gateway_own_cpu_ms_per_call": ms_per_call(own_s, thread_calls),
                "driver_cpu_ms_per_call": ms_per_call(after[0] - before[0], thread_calls),
                "engine_cpu_ms_per_call": ms_per_call(after[1] - before[1], thread_calls),
            },
            "client_floor": conc_floor,
            "load_avg_1m_at_end": conc_load,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (random, default), builtin:NAME or a folder")
    parser.add_argument("--calls", type=int, default=200, help="sequential calls per path")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--concurrent-calls", type=int, default=320, help="calls per path in the concurrent run"
    )
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens of every call")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--engine-threads",
        help="inference.engine_threads of the engine and the peer (the config's `auto`: every core, which the "
        "caller's client and gateway then take from the engine; 1 on 2 cores leaves the caller a core of its own)",
    )
    parser.add_argument(
        "--out", help="result file (default: results/gateway_overhead[_<model>][_tokens<N>].json)"
    )
    args = parser.parse_args()

    import ray

    from lightning_ray.config import load_config
    from lightning_ray.inference.server import deploy_inference
    from lightning_ray.models import make_tiny_model, resolve_model

    load_before = load_avg()
    tmp = tempfile.TemporaryDirectory(prefix="lr-bench-")
    if args.model == "tiny":
        model_dir, dtype = make_tiny_model(Path(tmp.name) / "tiny"), "float32"
    else:
        model_dir, dtype = resolve_model(args.model), "bfloat16"
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            f"model.dtype={dtype}",
            "inference.max_model_len=1024",
            "inference.num_cpus_per_replica=1",
            f"inference.max_num_seqs={max(32, args.concurrency)}",
            f"inference.sampling.max_tokens={args.tokens}",
            *([f"inference.engine_threads={args.engine_threads}"] if args.engine_threads else []),
        ],
        check_files=False,
    )
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    peer = None
    try:
        t0 = time.perf_counter()
        handle = deploy_inference(model_dir, cfg.model, cfg.inference)
        start_s = time.perf_counter() - t0
        served_name = handle.model_info.remote().result()["model"]
        t0 = time.perf_counter()
        peer, peer_url = start_vllm_openai(model_dir, cfg, served_name, Path(tmp.name) / "vllm_openai.log")
        peer_start_s = time.perf_counter() - t0
        measured = asyncio.run(bench(args, handle, cfg, psutil.Process(peer.pid), peer_url))
    finally:
        from ray import serve

        if peer is not None:
            stop_vllm_openai(peer)
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    result = {
        "model": args.model,
        "dtype": dtype,
        "max_tokens": args.tokens,
        "greedy": True,
        **measured,
        "engine_start_s": round(start_s, 1),
        "vllm_openai_start_s": round(peer_start_s, 1),
        "gateway_placement": "sidecar in the caller's event loop (as in a RolloutWorker)",
        "engine_threads": cfg.inference.engine_threads,
        "machine": f"{os.cpu_count()} CPU cores",
        "load_avg_1m_before_after": [load_before, load_avg()],
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()) + " UTC",
        "command": "python -m benchmarks.gateway_overhead "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
    }
    print(json.dumps(result, indent=2))
    suffix = "" if args.model == "tiny" else "_" + args.model.removeprefix("builtin:").replace("/", "_")
    suffix += "" if args.tokens == 16 else f"_tokens{args.tokens}"
    suffix += f"_threads{args.engine_threads}" if args.engine_threads else ""
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"gateway_overhead{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
