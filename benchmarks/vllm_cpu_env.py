"""What vLLM's CPU guide advises, measured: tcmalloc and Intel OpenMP in LD_PRELOAD, OpenMP thread binding.

    flock /tmp/lr-heavy.lock python -m benchmarks.vllm_cpu_env [--models tiny builtin:smollm2-135m-instruct]
        [--variants ...] [--rounds 2] [--requests 32] [--tokens 128] [--contend 0] [--out NAME.json]

For each model, each variant gets a fresh replica (a preload takes effect only in a new process) and the same
generation batch as `benchmarks/inference_throughput.py` (32 concurrent requests x 128 tokens, seeded sampling,
one warm-up batch). Rounds run the variants forward then backward, so a drift in the box's load touches every
variant alike. Each variant also records which preload libraries are really mapped in each vLLM process of the
replica (`/proc/<pid>/maps`) and their CPU affinity. `--contend K` keeps K busy-looping processes running during
the measurements, as a learner would on this box. Writes benchmarks/results/vllm_cpu_env.json
(vllm_cpu_env_contended.json with --contend).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.inference_throughput import chat_prompts, generation_rate

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

# name -> (inference.cpu_preload, inference.cpu_threads_bind); the first is the baseline (the code before).
VARIANTS: dict[str, tuple[list[str], str]] = {
    "baseline": ([], "nobind"),
    "tcmalloc": (["tcmalloc"], "nobind"),
    "iomp": (["iomp"], "nobind"),
    "tcmalloc+iomp": (["tcmalloc", "iomp"], "nobind"),
    "tcmalloc+iomp+bind_auto": (["tcmalloc", "iomp"], "auto"),
}


def measure_variant(model_dir: Path, model_path: str, variant: str, prompts, args) -> dict[str, Any]:
    from ray import serve

    from lightning_ray.config import load_config
    from lightning_ray.inference.server import APP_NAME, deploy_inference

    preload, bind = VARIANTS[variant]
    cfg = load_config(
        None,
        [
            f"model.path={model_path}",
            "inference.kv_cache_gib=2",
            f"inference.cpu_preload={json.dumps(preload)}",
            f"inference.cpu_threads_bind={bind}",
        ],
        check_files=False,
    )
    t0 = time.perf_counter()
    handle = deploy_inference(model_dir, cfg.model, cfg.inference)
    start_s = time.perf_counter() - t0
    processes = handle.engine_processes.remote().result()
    load_before = os.getloadavg()[0]
    generated, wall = generation_rate(handle, prompts, args.tokens)
    load_after = os.getloadavg()[0]
    serve.delete(APP_NAME)
    return {
        "tokens_per_s": round(generated / wall, 1),
        "generated_tokens": generated,
        "wall_s": round(wall, 2),
        "engine_start_s": round(start_s, 1),
        "load_avg_1m_before_after": [round(load_before, 2), round(load_after, 2)],
        "processes": processes,
    }


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    base = statistics.mean(r["tokens_per_s"] for r in runs["baseline"])
    out = {}
    for name, rs in runs.items():
        mean = statistics.mean(r["tokens_per_s"] for r in rs)
        out[name] = {
            "tokens_per_s_mean": round(mean, 1),
            "ratio_to_baseline": round(mean / base, 3),
            "tokens_per_s": [r["tokens_per_s"] for r in rs],
            "load_avg_1m_before_after": [r["load_avg_1m_before_after"] for r in rs],
            "engine_start_s": [r["engine_start_s"] for r in rs],
            "processes": rs[0]["processes"],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["tiny", "builtin:smollm2-135m-instruct"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--contend", type=int, default=0, help="busy-looping processes during the runs")
    parser.add_argument("--out", help="results file name (default vllm_cpu_env[_contended].json)")
    args = parser.parse_args()
    variants = ["baseline", *(v for v in args.variants if v != "baseline")]

    import ray

    from lightning_ray.models import make_tiny_model, resolve_model

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.contend)]
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for model_path in args.models:
                if model_path == "tiny":
                    model_path = str(make_tiny_model(Path(tmp) / "tiny"))
                    name = "tiny (2 layers, hidden 128)"
                else:
                    name = model_path
                model_dir = resolve_model(model_path)
                prompts = chat_prompts(model_dir, args.requests)
                runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
                for r in range(args.rounds):
                    for v in variants if r % 2 == 0 else variants[::-1]:
                        runs[v].append(measure_variant(model_dir, model_path, v, prompts, args))
                        print(f"{name} round {r} {v}: {runs[v][-1]['tokens_per_s']} tok/s", flush=True)
                results[name] = summarize(runs)
    finally:
        for p in busy:
            p.kill()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python -m benchmarks.vllm_cpu_env", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()} CPU cores",
        "requests": args.requests,
        "max_tokens": args.tokens,
        "rounds": args.rounds,
        "contending_processes": args.contend,
        "variants": {
            v: {"cpu_preload": VARIANTS[v][0], "cpu_threads_bind": VARIANTS[v][1]} for v in variants
        },
        "models": results,
    }
    print(json.dumps(result, indent=2))
    name = args.out or ("vllm_cpu_env_contended.json" if args.contend else "vllm_cpu_env.json")
    out = Path(__file__).parent / "results" / name
    out.write_text(json.dumps(result, indent=2) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
