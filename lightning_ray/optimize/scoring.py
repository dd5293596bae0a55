"""Candidates on the rollout stack: a prompt's score on the validation split, and its failures on a minibatch.

Both run through the same task pools, rollout workers, gateways and replicas as `train` (`first_tasks`,
`collect_batch`); the prompt under test reaches the agent as the batch's `prompts` (`llm.prompt(name)`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_ray.config import Config, resolve_path
from lightning_ray.optimize.editor import Failure
from lightning_ray.rollouts.collect import collect_batch, first_tasks, held_out_scores
from lightning_ray.rollouts.supervisor import RolloutWorkers
from lightning_ray.tasks.dataset import load_tasks

METRICS = {"reward": "reward_mean", "success": "success_rate"}  # optimize.metric -> held_out_scores key


@dataclass
class Stack:
    """The parts of a running rollout stack that scoring uses (`rollouts.stack.start_rollout_stack`)."""

    val_pool: Any
    workers: RolloutWorkers
    train_pool: Any | None = None  # the search's minibatches; selection needs none


def prompts_with(cfg: Config, text: str | None) -> dict[str, str]:
    """The config's prompts with `optimize.prompt` set to `text` (None: left out, so the agent's default)."""
    prompts = {k: v for k, v in cfg.prompts.items() if k != cfg.optimize.prompt}
    return prompts if text is None else {**prompts, cfg.optimize.prompt: text}


def score_prompt(
    cfg: Config, stack: Stack, text: str | None, limit: int | None
) -> tuple[float, dict[str, Any]]:
    """`optimize.metric` of one greedy rollout on each of the validation split's first `limit` tasks, and the
    other numbers (success_rate, reward_mean, failure_rate, tasks)."""
    sampling = {"temperature": 0.0, "prompts": prompts_with(cfg, text)}
    batch = first_tasks(stack.val_pool, stack.workers, limit, sampling, "scoring")
    scores = held_out_scores(batch, cfg.trainer.success_threshold)
    return scores[METRICS[cfg.optimize.metric]], {**scores, "tasks": len(batch.records)}


def train_tasks(cfg: Config) -> dict[str, dict[str, Any]]:
    """The training split's rows by task id: what the critic is shown of a failed task."""
    base = Path(cfg.source).parent if cfg.source else Path.cwd()
    return {t.task_id: t.data for t in load_tasks(resolve_path(cfg.data.train, base))}


def minibatch_failures(
    cfg: Config, stack: Stack, text: str, tasks: dict[str, dict[str, Any]]
) -> list[Failure]:
    """Run the training split's next `optimize.minibatch_size` tasks once each with `text` (the run's sampling),
    and return those below `trainer.success_threshold`, the lowest reward first."""
    if stack.train_pool is None:
        raise ValueError("minibatch_failures: the stack has no training pool")
    batch = collect_batch(
        stack.train_pool,
        stack.workers,
        cfg.optimize.minibatch_size,
        group_size=1,
        desc="minibatch",
        sampling={"prompts": prompts_with(cfg, text)},
    )
    replies: dict[str, list[tuple[int, str]]] = defaultdict(list)
    calls = batch.transitions.select(["rollout_id", "call_index", "response_text"]).to_pylist()
    for call in calls:
        replies[call["rollout_id"]].append((call["call_index"], call["response_text"] or ""))
    failed = [r for r in batch.records if r.reward is None or r.reward < cfg.trainer.success_threshold]
    failed.sort(key=lambda r: r.reward if r.reward is not None else float("-inf"))
    return [
        Failure(
            tasks.get(r.task_id, {"id": r.task_id}), [t for _, t in sorted(replies[r.rollout_id])], r.reward
        )
        for r in failed
    ]
