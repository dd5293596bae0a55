"""Offline check of the prompt on the real model: format compliance and reward of sampled episodes.

Runs the agent's own protocol (:func:`examples.calc.protocol.record_reply`) with HF ``generate`` in place
of an OpenAI endpoint, batching every live episode per turn. No Ray, no vLLM, no network:

    flock /tmp/lr-heavy.lock python -m examples.calc.check_prompt --questions 20 --samples 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

from examples.calc.make_dataset import DATA_DIR
from examples.calc.protocol import Episode, record_reply, start_episode
from examples.calc.reward import answer_reward, extract_answer, parse_number, shaped_reward


def load_questions(path: Path, n: int) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


def generate_replies(model, tokenizer, episodes: list[Episode], args: argparse.Namespace) -> list[str]:
    """One sampled reply per episode, in one left-padded batch."""
    import torch

    texts = [
        tokenizer.apply_chat_template(e.messages, tokenize=False, add_generation_prompt=True)
        for e in episodes
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(
            **batch,
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else None,
            top_p=args.top_p if args.temperature > 0 else None,
            max_new_tokens=args.max_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def run_batch(model, tokenizer, tasks: list[dict], args: argparse.Namespace) -> list[Episode]:
    """Play ``args.samples`` episodes per task to the end, one batched generate per turn."""
    episodes = [start_episode(task["question"]) for task in tasks for _ in range(args.samples)]
    live = list(episodes)
    while live:
        replies = generate_replies(model, tokenizer, live, args)
        live = [e for e, reply in zip(live, replies, strict=True) if not record_reply(e, reply)]
    return episodes


def groups_with_variance(rewards: list[float], samples: int) -> float:
    """The share of GRPO groups (``samples`` consecutive episodes of one task) whose rewards differ."""
    groups = [rewards[i : i + samples] for i in range(0, len(rewards), samples)]
    return sum(len(set(g)) > 1 for g in groups) / len(groups)


def summarize(tasks: list[dict], episodes: list[Episode], samples: int) -> dict:
    """Format compliance, tool use, strict accuracy, the training (shaped) reward and GRPO groups with variance."""
    rewards, shaped, per_level = [], [], defaultdict(list)
    for i, episode in enumerate(episodes):
        expected = float(tasks[i // samples]["answer"])
        rewards.append(answer_reward(episode.final_reply, expected))
        shaped.append(shaped_reward(episode.final_reply, expected, episode.tool_calls))
        per_level[tasks[i // samples].get("level", 0)].append(rewards[-1])
    answers = [extract_answer(e.final_reply) for e in episodes]
    return {
        "episodes": len(episodes),
        "answer_tag": sum(a is not None for a in answers) / len(episodes),
        "format_ok": sum(a is not None and parse_number(a) is not None for a in answers) / len(episodes),
        "tool_use": sum(e.tool_calls > 0 for e in episodes) / len(episodes),
        "accuracy": statistics.mean(rewards),
        "accuracy_by_level": {level: statistics.mean(r) for level, r in sorted(per_level.items())},
        "groups_with_variance": groups_with_variance(rewards, samples),
        "shaped_reward": statistics.mean(shaped),
        "groups_with_variance_shaped": groups_with_variance(shaped, samples),
        "mean_llm_calls": statistics.mean(
            sum(m["role"] == "assistant" for m in e.messages) - 2 for e in episodes
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=DATA_DIR / "train.jsonl")
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--show", type=int, default=6, help="print this many episodes")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_ray.models import resolve_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tasks = load_questions(args.data, args.questions)
    start = time.perf_counter()
    episodes = run_batch(model, tokenizer, tasks, args)
    summary = summarize(tasks, episodes, args.samples) | {"seconds": round(time.perf_counter() - start, 1)}
    for episode in episodes[: args.show]:
        print("---", [m["content"] for m in episode.messages[6:]])
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
