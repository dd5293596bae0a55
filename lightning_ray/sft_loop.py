"""The loop's SFT parts (`algorithm.name: sft`): the best of each streamed group, and the steps over files.

With `sft.source: rollouts` the loop runs as for GRPO: the stream brings G samples per task, and in place of
advantages each group's best rollouts that reach `sft.min_reward` train (`best_of_groups`); the ledger enters
every other one as dropped with its reason. With `sft.source: files` no rollout is sampled but validation's:
`run_file_steps` trains step after step on the batches of `SftFiles`, then sends the weights to the replicas
(so validation and a later resume serve the trained policy) and checkpoints as the loop does.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from lightning_ray.algorithms.sft import select_best
from lightning_ray.checkpoints import writing_checkpoint
from lightning_ray.config import AlgorithmConfig, Config
from lightning_ray.config.sft import sft_steps
from lightning_ray.data.merge import select_trained_calls
from lightning_ray.data.schema import write_parquet
from lightning_ray.data.sft_files import SftFiles, load_sft_files
from lightning_ray.learner.group import LearnerGroup
from lightning_ray.monitor.run_log import RunLog
from lightning_ray.monitor.step_metrics import sync_metrics
from lightning_ray.monitor.watchdog import Watchdog
from lightning_ray.rollouts.collect import Batch
from lightning_ray.rollouts.ledger import Ledger
from lightning_ray.rollouts.supervisor import RolloutWorkers
from lightning_ray.weights import sync_weights

SFT_METRICS = ("loss", "tokens", "sequences")  # the learner's, logged as sft/*


def sft_files(cfg: Config) -> SftFiles | None:
    """With `sft.source: files`, the selected data (a bad file fails here, before Ray starts); `sft.epochs`
    sets `trainer.steps`."""
    if cfg.algorithm.name != "sft" or cfg.sft.source != "files":
        return None
    files = load_sft_files(cfg)
    cfg.trainer.steps = sft_steps(cfg.sft, len(files.rollout_ids), cfg.trainer.steps)
    s = files.stats
    print(
        f"sft: {s['rollouts_kept']} rollouts of {s['groups_kept']} groups from {s['files']} files "
        f"({s['rollouts']} read), {cfg.sft.batch_size} a step for {cfg.trainer.steps} steps",
        flush=True,
    )
    return files


def learner_metrics(learned: dict[str, float], algo: AlgorithmConfig) -> dict[str, float]:
    """A learner step's metrics under `learner/`; with sft its loss (the NLL), tokens and sequences under `sft/`."""
    sft = algo.name == "sft"
    return {f"{'sft' if sft and k in SFT_METRICS else 'learner'}/{k}": v for k, v in learned.items()}


def best_of_groups(
    batch: Batch, cfg: Config, ledger: Ledger, version: int
) -> tuple[pa.Table, dict[str, Any]]:
    """Rejection sampling on a streamed batch: the calls of each group's best rollouts (`select_best`), and its
    metrics as `sft/*`. The others enter the ledger as dropped with their reason (those that failed as failed);
    the loop marks the kept ones trained after the step."""
    kept, dropped, stats = select_best(batch.transitions, cfg.sft.min_reward, cfg.sft.per_group)
    by_reason: dict[str, list[Any]] = defaultdict(list)
    for record in batch.records:
        if record.rollout_id in dropped:
            by_reason[dropped[record.rollout_id]].append(record)
    for reason, records in by_reason.items():
        ledger.dropped(records, reason, version)
    return kept, {f"sft/{k}": v for k, v in stats.items()}


def run_file_steps(
    cfg: Config,
    start: int,
    run_dir: Path,
    files: SftFiles,
    learners: LearnerGroup,
    inference: Any,
    val_pool: Any,
    workers: RolloutWorkers,
    log: RunLog,
    watchdog: Watchdog,
) -> None:
    """Steps `start + 1` .. `trainer.steps` on `files` (`sft.source: files`). Each step's calls go to
    RUN_DIR/trajectories/step-N.parquet as a GRPO step's do, so the run page shows what trained."""
    from lightning_ray.loop import end_step, training_rows, validate  # loop imports us

    for step in range(start + 1, cfg.trainer.steps + 1):
        t0 = time.perf_counter()
        calls, metrics = files.batch(step, cfg.sft.batch_size, cfg.trainer.seed, cfg.data.shuffle)
        write_parquet(calls, run_dir, f"step-{step:06d}")
        table = select_trained_calls(training_rows(calls, cfg), cfg.rollout.train_agents)
        metrics.update(learner_metrics(learners.train_step(table, cfg.algorithm), cfg.algorithm))
        watchdog.beat()
        t1 = time.perf_counter()
        metrics.update(sync_metrics(sync_weights(learners, inference, step, cfg)))
        watchdog.beat()
        metrics.update({"time/learner_s": t1 - t0, "time/broadcast_s": time.perf_counter() - t1})
        if val_pool is not None and step % cfg.trainer.val_every == 0:
            metrics.update(validate(cfg, val_pool, workers))
        metrics["time/step_s"] = time.perf_counter() - t0
        end_step(cfg, step, metrics, log, watchdog, lambda s: save_learners(run_dir, s, learners))


def save_learners(run_dir: Path, step: int, learners: LearnerGroup) -> None:
    """A checkpoint of the learners alone (no stream, no data position: nothing was sampled)."""
    from lightning_ray.loop import checkpoint_dir  # loop imports us

    with writing_checkpoint(path := checkpoint_dir(run_dir, step)):
        learners.save_checkpoint(path, extra={"step": step})
