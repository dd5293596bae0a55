"""`lightning-ray rollout CONFIG`: the dataset (or `--limit N` tasks) through the agent once, summarised."""

from __future__ import annotations

import json
from typing import Any

from lightning_ray.config import Config
from lightning_ray.data.schema import write_parquet
from lightning_ray.faults import TaskPoolLost, get
from lightning_ray.monitor.metrics import record_batch_metrics
from lightning_ray.monitor.watchdog import PROBE_TIMEOUT_S
from lightning_ray.rollouts.collect import collect_batch
from lightning_ray.rollouts.stack import start_rollout_stack, stop_rollout_stack
from lightning_ray.run_files import replace_file
from lightning_ray.runtime import init_ray, run_directory


def run_rollout(cfg: Config, limit: int | None = None, split: str = "train") -> dict[str, Any]:
    init_ray(cfg)
    run_dir = run_directory(cfg, "rollout")
    _, pool, workers = start_rollout_stack(cfg, split)
    try:
        num_tasks = limit or get(pool.num_tasks.remote(), "task pool", PROBE_TIMEOUT_S, lost=TaskPoolLost)
        batch = collect_batch(pool, workers, num_tasks, desc=f"rollout {split}")
    finally:
        stop_rollout_stack(cfg, workers, [pool])
    record_batch_metrics(batch.summary, run=cfg.trainer.name)
    write_parquet(batch.transitions, run_dir, "rollout-transitions")
    write_parquet(batch.rollouts, run_dir, "rollout-rollouts")
    summary = {
        **batch.summary.to_dict(),
        "tasks": num_tasks,
        "llm_calls": batch.transitions.num_rows,
        "seconds": round(batch.seconds, 2),
        "rollouts_per_s": round(batch.summary.num_rollouts / batch.seconds, 3),
        "run_dir": str(run_dir),
    }
    text = json.dumps(summary, indent=2, default=str) + "\n"
    replace_file(run_dir / "summary.json", lambda tmp: tmp.write_text(text), "writing the summary")
    s = batch.summary
    reward = "n/a" if s.reward_mean is None else f"{s.reward_mean:.3f} ± {s.reward_std:.3f}"
    print(
        f"{s.num_rollouts} rollouts of {num_tasks} tasks in {batch.seconds:.1f}s: success {s.success_rate:.1%}, "
        f"reward {reward}, {batch.transitions.num_rows} LLM calls"
    )
    if s.num_succeeded < s.num_rollouts:
        print(s.diagnosis())
    print(f"trajectories and summary.json in {run_dir}")
    return summary
