"""The TRL side of `benchmarks.grpo_step`: `GRPOTrainer` on CPU with the same model, task, batch and token budget,
timing each step's generation-and-scoring pass (its rollout) and the rest (its learner). Runs in a process of its
own (`python -m benchmarks.grpo_step --side trl`), so TRL never shares an interpreter with Ray or vLLM."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

from benchmarks.grpo_step import CLIP_HIGH, CLIP_LOW, MODEL, TRAIN, TRL_THREADS, later_steps, median
from examples.calc.prompt import initial_messages
from examples.calc.reward import answer_reward


def load_tasks(n: int) -> list[dict[str, Any]]:
    with TRAIN.open() as f:
        rows = [json.loads(line) for _, line in zip(range(n), f, strict=False)]
    if len(rows) < n:
        raise ValueError(f"{TRAIN} holds {len(rows)} tasks, need {n}")
    return rows


def trl_reward(completions: list[Any], answer: list[float], **_: Any) -> list[float]:
    """`answer_reward` on each conversational completion (a list holding the assistant message)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [answer_reward(t, float(a)) for t, a in zip(texts, answer, strict=True)]


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from lightning_ray.models import resolve_model

    torch.set_num_threads(TRL_THREADS)
    t_start = time.perf_counter()

    class TimedGRPOTrainer(trl.GRPOTrainer):
        """GRPOTrainer that records the time of each generation-and-scoring pass (its rollout)."""

        def __init__(self, *a: Any, **kw: Any) -> None:
            self.rollout_s: list[float] = []
            self.generate_s: list[float] = []
            super().__init__(*a, **kw)

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                self.rollout_s.append(time.perf_counter() - t0)

        def _generate(self, prompts):
            t0 = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                self.generate_s.append(time.perf_counter() - t0)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.begin: float | None = None
            self.step_s: list[float] = []
            self.logs: list[dict[str, Any]] = []
            self.first_step_at: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()
            if self.first_step_at is None:
                self.first_step_at = self.begin

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self.begin)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    folder = resolve_model(MODEL)
    tasks = load_tasks(args.steps * args.tasks)
    dataset = Dataset.from_list(
        [{"prompt": initial_messages(t["question"]), "answer": float(t["answer"])} for t in tasks]
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="grpo-step-trl-") as tmp:
        config = trl.GRPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.tasks * args.group,
            gradient_accumulation_steps=1,
            num_generations=args.group,
            max_completion_length=args.max_tokens,
            temperature=1.0,
            top_p=1.0,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            max_steps=args.steps,
            num_iterations=1,
            beta=0.0,
            epsilon=CLIP_LOW,
            epsilon_high=CLIP_HIGH,
            loss_type="dapo",
            scale_rewards="group",
            use_vllm=False,
            bf16=False,
            fp16=False,
            use_cpu=True,
            shuffle_dataset=False,
            report_to=[],
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
            dataloader_num_workers=0,
        )
        timer = StepTimer()
        trainer = TimedGRPOTrainer(
            model=model,
            reward_funcs=trl_reward,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        t_init = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t_init

    train_logs = [log for log in timer.logs if "loss" in log or "reward" in log]
    steps = []
    for i, step_s in enumerate(timer.step_s):
        rollout = trainer.rollout_s[i]
        log = train_logs[i] if i < len(train_logs) else {}
        length = log.get("completions/mean_length")
        steps.append(
            {
                "step": i + 1,
                "rollout_s": rollout,
                "generate_s": trainer.generate_s[i],
                "learner_s": step_s - rollout,
                "broadcast_s": 0.0,
                "step_s": step_s,
                "response_tokens": length * args.tasks * args.group if length is not None else None,
                "reward_mean": log.get("reward"),
            }
        )
    later = later_steps(steps)
    return {
        "trl_version": trl.__version__,
        "threads": {
            "torch": torch.get_num_threads(),
            "generation": "transformers generate, fp32",
            "precision": "float32",
            "per_device_train_batch_size": config.per_device_train_batch_size,
        },
        "startup": {
            "model_and_trainer_s": round(t_init - t_start, 2),
            "total_before_first_step_s": round((timer.first_step_at or t_init) - t_start, 2),
        },
        "train_wall_s": round(wall, 2),
        "steps": [{k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()} for s in steps],
        "median_steps_2_to_n": {
            k: median([s[k] for s in later])
            for k in ("rollout_s", "generate_s", "learner_s", "broadcast_s", "step_s", "response_tokens")
        },
    }
