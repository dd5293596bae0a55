"""Generation throughput of the inference service: N concurrent requests x T tokens on SmolLM2.

    python benchmarks/inference_throughput.py [--requests 32] [--tokens 128] [--eager/--compiled]

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--compiled", action="store_true", help="torch.compile instead of eager")
    args = parser.parse_args()

    import ray
    from transformers import AutoTokenizer

    from lightning_ray.config import load_config
    from lightning_ray.inference.server import deploy_inference
    from lightning_ray.models import resolve_model

    cfg = load_config(
        None,
        [
            f"model.path={args.model}",
            f"inference.enforce_eager={not args.compiled}",
            "inference.kv_cache_gib=2",
        ],
        check_files=False,
    )
    model_dir = resolve_model(cfg.model.path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for i in range(args.requests)
    ]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    t0 = time.perf_counter()
    handle = deploy_inference(model_dir, cfg.model, cfg.inference)
    start_s = time.perf_counter() - t0
    sampling = {"temperature": 1.0, "max_tokens": args.tokens, "seed": 0}

    async def run() -> list[dict]:
        return await asyncio.gather(
            *[handle.generate.remote(p, {**sampling, "seed": i}) for i, p in enumerate(prompts)]
        )

    asyncio.run(run())  # warm-up (first batch allocates buffers)
    t0 = time.perf_counter()
    outs = asyncio.run(run())
    wall = time.perf_counter() - t0
    generated = sum(len(o["response_ids"]) for o in outs)
    result = {
        "model": args.model,
        "requests": args.requests,
        "max_tokens": args.tokens,
        "generated_tokens": generated,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(generated / wall, 1),
        "engine_start_s": round(start_s, 1),
        "enforce_eager": not args.compiled,
        "machine": f"{os.cpu_count()} CPU cores",
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "inference_throughput.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
