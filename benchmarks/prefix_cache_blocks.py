"""What the KV block size costs a CPU engine on the calc agent's conversations: the prefix cache reuses whole blocks.

    flock /tmp/lr-heavy.lock python -m benchmarks.prefix_cache_blocks [--block-sizes 128 32] [--rounds 2]
        [--tasks 3] [--group 8] [--tokens 64] [--out NAME.json]

The workload is the quickstart's: `--tasks` calc questions x `--group` samples, each a two-turn conversation as
the calc agent has it (system rule and demo exchanges, the question; the model's reply, then "Result: N" and a
second reply), sampled at temperature 1 with a seed per conversation, all conversations of a turn at once,
through the real Serve replica (`InferenceServer.generate` on token ids, as the gateway calls it). Turn 2's ids
are the chat re-rendered with turn 1's reply, as the gateway renders an agent's next call. Each block size gets a
fresh replica per round (`inference.block_size`), one warm-up set of conversations on other questions, then the
measured set; rounds run the sizes forward then backward, so a drift in the box's load touches each alike.
Per size: wall seconds, generated tokens per second, and the prompt tokens the engine computed against those
its prefix cache held (`InferenceServer.load_totals`). Writes benchmarks/results/prefix_cache_blocks.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

TRAIN = Path(__file__).parents[1] / "examples" / "calc" / "data" / "train.jsonl"


def conversations(tasks: list[dict[str, Any]], group: int) -> list[tuple[int, str]]:
    """(seed, question) for each sample of each task."""
    return [(t * group + i, task["question"]) for t, task in enumerate(tasks) for i in range(group)]


def run_set(handle: Any, tok: Any, convs: list[tuple[int, str]], max_tokens: int) -> dict[str, Any]:
    """Both turns of every conversation (each turn all at once); generated tokens and wall seconds."""
    from examples.calc.prompt import initial_messages

    def ids(messages: list[dict[str, str]]) -> list[int]:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    async def turn(prompts: list[list[int]]) -> list[dict[str, Any]]:
        sampling = {"temperature": 1.0, "max_tokens": max_tokens}
        calls = [
            handle.generate.remote(p, {**sampling, "seed": s})
            for p, (s, _) in zip(prompts, convs, strict=True)
        ]
        return await asyncio.gather(*calls)

    before = handle.load_totals.remote().result()
    t0 = time.perf_counter()
    first = [initial_messages(q) for _, q in convs]
    replies = asyncio.run(turn([ids(m) for m in first]))
    second = [
        [*m, {"role": "assistant", "content": tok.decode(r["response_ids"], skip_special_tokens=True)}]
        + [{"role": "user", "content": "Result: 42"}]
        for m, r in zip(first, replies, strict=True)
    ]
    answers = asyncio.run(turn([ids(m) for m in second]))
    wall = time.perf_counter() - t0
    after = handle.load_totals.remote().result()
    prompt = after["prompt_tokens"] - before["prompt_tokens"]
    cached = after["cached_prompt_tokens"] - before["cached_prompt_tokens"]
    generated = sum(len(r["response_ids"]) for r in replies + answers)
    return {
        "wall_s": round(wall, 2),
        "generated_tokens": generated,
        "tokens_per_s": round(generated / wall, 1),
        "prompt_tokens": prompt,
        "prompt_tokens_computed": prompt - cached,
        "prefix_cache_hit_frac": round(cached / prompt, 3) if prompt else None,
    }


def measure(model_dir: Path, block_size: int, warm: list, convs: list, args: argparse.Namespace) -> dict:
    from ray import serve
    from transformers import AutoTokenizer

    from lightning_ray.config import load_config
    from lightning_ray.inference.server import APP_NAME, deploy_inference

    cfg = load_config(
        None,
        [f"model.path={args.model}", "inference.kv_cache_gib=2", f"inference.block_size={block_size}"],
        check_files=False,
    )
    handle = deploy_inference(model_dir, cfg.model, cfg.inference)
    tok = AutoTokenizer.from_pretrained(model_dir)
    try:
        run_set(handle, tok, warm, args.tokens)
        load_before = os.getloadavg()[0]
        out = run_set(handle, tok, convs, args.tokens)
        return {**out, "load_avg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    finally:
        serve.delete(APP_NAME)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument(
        "--block-sizes", type=int, nargs="+", default=[128, 32], help="the first is the baseline"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default="prefix_cache_blocks.json")
    args = parser.parse_args()

    import ray

    from lightning_ray.models import resolve_model

    lines = [json.loads(line) for line in TRAIN.read_text().splitlines()]
    warm = conversations(lines[100 : 100 + args.tasks], args.group)
    convs = conversations(lines[: args.tasks], args.group)
    model_dir = resolve_model(args.model)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    runs: dict[int, list[dict[str, Any]]] = {b: [] for b in args.block_sizes}
    try:
        for r in range(args.rounds):
            for b in args.block_sizes if r % 2 == 0 else args.block_sizes[::-1]:
                runs[b].append(measure(model_dir, b, warm, convs, args))
                print(f"round {r} block_size {b}: {json.dumps(runs[b][-1])}", flush=True)
    finally:
        ray.shutdown()
    base = statistics.mean(x["wall_s"] for x in runs[args.block_sizes[0]])
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python -m benchmarks.prefix_cache_blocks", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()} CPU cores, one engine thread",
        "model": args.model,
        "workload": {"tasks": args.tasks, "group": args.group, "turns": 2, "max_tokens": args.tokens},
        "block_sizes": {
            str(b): {
                "wall_s_mean": round(statistics.mean(x["wall_s"] for x in rs), 2),
                "speedup_vs_first": round(base / statistics.mean(x["wall_s"] for x in rs), 3),
                "runs": rs,
            }
            for b, rs in runs.items()
        },
    }
    print(json.dumps(result, indent=2))
    (Path(__file__).parent / "results" / args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
