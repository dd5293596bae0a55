"""Generation throughput of the inference service: N concurrent requests x T tokens on SmolLM2.

    python benchmarks/inference_throughput.py [--requests 32] [--tokens 128] [--compiled] [--out NAME] [KEY=VALUE ...]

KEY=VALUE are config overrides, e.g. `inference.engine_threads=2 inference.cpu_executor=mp`.

Prints tokens/s through the Ray Serve handle (the path the gateway uses) and writes
benchmarks/results/inference_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a prime number is.",
    "Give three tips for learning to cook.",
    "What does a compiler do?",
    "Describe a rainy day in two sentences.",
    "Why is the sky blue?",
    "List four animals that live in the ocean.",
]


def chat_prompts(model_dir: str | Path, n: int) -> list[list[int]]:
    """`n` single-turn chat prompts (token ids), cycling through QUESTIONS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for i in range(n)
    ]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def generation_rate(handle, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
    """Generated tokens and wall seconds of all `prompts` at once (seeded sampling), after one warm-up batch
    (the first batch allocates buffers)."""
    sampling = {"temperature": 1.0, "max_tokens": max_tokens}

    async def run() -> list[dict]:
        return await asyncio.gather(
            *[handle.generate.remote(p, {**sampling, "seed": i}) for i, p in enumerate(prompts)]
        )

    asyncio.run(run())
    t0 = time.perf_counter()
    outs = asyncio.run(run())
    return sum(len(o["response_ids"]) for o in outs), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--compiled", action="store_true", help="torch.compile instead of eager")
    parser.add_argument("overrides", nargs="*", help="config overrides, KEY=VALUE")
    parser.add_argument("--out", default="inference_throughput", help="result name under benchmarks/results/")
    args = parser.parse_args()

    import ray

    from lightning_ray.config import load_config
    from lightning_ray.inference.server import deploy_inference
    from lightning_ray.models import resolve_model
    from lightning_ray.precision import resolve_precision

    cfg = load_config(
        None,
        [
            f"model.path={args.model}",
            f"inference.enforce_eager={not args.compiled}",
            "inference.kv_cache_gib=2",
            *args.overrides,
        ],
        check_files=False,
    )
    model_dir = resolve_model(cfg.model.path)
    prompts = chat_prompts(model_dir, args.requests)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    t0 = time.perf_counter()
    handle = deploy_inference(model_dir, cfg.model, cfg.inference)
    start_s = time.perf_counter() - t0
    generated, wall = generation_rate(handle, prompts, args.tokens)
    result = {
        "model": args.model,
        "requests": args.requests,
        "max_tokens": args.tokens,
        "generated_tokens": generated,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(generated / wall, 1),
        "engine_start_s": round(start_s, 1),
        "enforce_eager": not args.compiled,
        "overrides": args.overrides,
        "engine_threads": cfg.inference.engine_threads,
        "cpu_executor": cfg.inference.cpu_executor,
        "dtype": resolve_precision(cfg.model.dtype),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "machine": f"{os.cpu_count()} CPU cores",
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / f"{args.out}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
