"""The central GRPO loop: rollouts -> advantages -> learner step -> weight broadcast -> metrics -> checkpoint.

Everything heavy runs in Ray actors (inference replicas, rollout workers, the task pools, DeepSpeed
learners); this driver only moves object refs and small dicts, so it reads top to bottom in one sitting.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray
from tqdm import tqdm

from lightning_ray.algorithms.advantages import compute_advantages
from lightning_ray.checkpoints import (
    STREAM_DIR,
    ResumePlan,
    latest_checkpoint,
    prune_checkpoints,
    resume_plan,
    writing_checkpoint,
)
from lightning_ray.config import Config
from lightning_ray.data.merge import merge_prefix_turns, select_trained_calls
from lightning_ray.data.schema import write_parquet
from lightning_ray.data.sft_files import SftFiles
from lightning_ray.faults import STARTUP_DEADLINE_S, TaskPoolLost, first_line, get
from lightning_ray.inference.canary import refuse_in_train
from lightning_ray.inference.replicas import replica_counts
from lightning_ray.learner.group import LearnerGroup
from lightning_ray.models import resolve_model
from lightning_ray.monitor.busy import BusyClock
from lightning_ray.monitor.metrics import record_batch_metrics, record_step_metrics
from lightning_ray.monitor.run_log import RunLog, step_line
from lightning_ray.monitor.staleness import stale_share, staleness_metrics
from lightning_ray.monitor.step_metrics import busy_metrics, rollout_metrics, sync_metrics
from lightning_ray.monitor.summary import check_failure_rate
from lightning_ray.monitor.watchdog import PROBE_TIMEOUT_S, Watchdog
from lightning_ray.rollouts.collect import Batch, first_tasks, held_out_scores
from lightning_ray.rollouts.ledger import Ledger, accounting, accounting_line
from lightning_ray.rollouts.stack import start_rollout_stack, stop_rollout_stack
from lightning_ray.rollouts.stream import RolloutStream, SavedStream, load_stream
from lightning_ray.rollouts.supervisor import RolloutWorkers
from lightning_ray.run_files import replace_file
from lightning_ray.runners.host import start_runner_gateway
from lightning_ray.runtime import init_ray, run_directory
from lightning_ray.scale import write_run_address
from lightning_ray.sft_loop import best_of_groups, learner_metrics, run_file_steps, sft_files
from lightning_ray.tasks.actor import task_pool_from_config
from lightning_ray.view.app import start_view
from lightning_ray.weights import OverlappedSync, overlaps, sync_weights

if TYPE_CHECKING:
    from lightning_ray.live.promotion import CanaryRelease


def train(cfg: Config, resume: str | None = None) -> list[dict[str, Any]]:
    """Train `cfg.trainer.steps` GRPO steps; with `resume`, continue a run directory from its last checkpoint.

    Step `s` trains policy version `s - 1` on groups streamed by `RolloutStream` (at most
    `trainer.max_staleness` versions behind), then the replicas serve version `s`. However the run ends,
    RUN_DIR/summary.json says how, with the accounting of every rollout the run started."""
    refuse_in_train(cfg)
    plan = resume_plan(resume) if resume else None  # a wrong folder fails before Ray starts
    files = sft_files(cfg)  # `sft.source: files`: read and selected before Ray starts
    init_ray(cfg)
    run_dir = run_directory(cfg, "train", resume)  # names the run's apps and actors (`lightning_ray.names`)
    write_run_address(run_dir, cfg)  # where `lightning-ray scale` finds the run
    inference, pool, workers = start_rollout_stack(cfg, "train")
    val_pool = learners = runners = None
    try:  # whatever fails from here on, the stack started above is stopped
        if cfg.gateway.runners.enabled:
            runners = start_runner_gateway(cfg, inference, pool, run_dir)
        val_pool = task_pool_from_config(cfg, "val") if cfg.data.val and cfg.trainer.val_every else None
        learners = start_learners(cfg)
        log = RunLog(cfg, run_dir, resume=resume is not None)
        run(cfg, plan, run_dir, inference, pool, workers, val_pool, learners, log, files)
    finally:
        if learners is not None:
            learners.shutdown()
        if runners is not None:
            runners.stop_sync()
        stop_rollout_stack(cfg, workers, [pool, val_pool])
    return log.rows


def start_learners(cfg: Config) -> LearnerGroup:
    """The run's DeepSpeed learners on the starting weights of `model.path`."""
    return LearnerGroup(
        cfg.learner,
        resolve_model(cfg.model.path),
        seed=cfg.trainer.seed,
        timeout_s=max(STARTUP_DEADLINE_S, cfg.trainer.stall_timeout_s),
        max_bad_steps=cfg.trainer.max_bad_steps,
    )


def run(
    cfg: Config,
    plan: ResumePlan | None,
    run_dir: Path,
    inference: Any,
    pool: Any,
    workers: RolloutWorkers,
    val_pool: Any,
    learners: LearnerGroup,
    log: RunLog,
    files: SftFiles | None = None,
    release: CanaryRelease | None = None,
) -> None:
    """The run under the watchdog: restore or validate, then the steps (of the rollout stream, or with `files`
    of SFT's files); RUN_DIR/summary.json however it ends. `release` replaces the weight sync to every replica
    (`serve --learn` with `inference.canary`)."""
    watchdog = Watchdog(run_dir, cfg.trainer.stall_timeout_s, progress_probes(workers, [pool, val_pool]))
    stream, end = None, {"status": "stopped", "cause": None, "steps_done": 0}
    print(f"run directory: {run_dir}")
    page = start_view(run_dir, cfg.logging.view_host, cfg.logging.view_port) if cfg.logging.view else None
    if page is not None:
        print(f"run page: {page.url}", flush=True)
    try:
        with watchdog.watching():
            start, saved = restore(cfg, plan, learners, pool, inference) if plan else (0, SavedStream())
            if plan is None and val_pool is not None:
                log.log(0, validate(cfg, val_pool, workers))
            if files is not None:
                run_file_steps(
                    cfg, start, run_dir, files, learners, inference, val_pool, workers, log, watchdog
                )
            else:
                ledger = Ledger(run_dir / "ledger.jsonl", keep_before_version=start if plan else None)
                stream = RolloutStream(cfg, pool, workers, ledger, version=start)
                stream.resume(saved)
                run_steps(cfg, start, run_dir, stream, learners, inference, val_pool, log, watchdog, release)
            end.update(status="completed", steps_done=cfg.trainer.steps)
    except BaseException as e:
        end["cause"] = first_line(e)
        raise
    finally:
        end["steps_done"] = end["steps_done"] or (log.rows[-1]["step"] if log.rows else 0)
        write_summary(run_dir, end, stream, pool, workers)
        log.close()
        if page is not None:
            page.stop()


def run_steps(
    cfg: Config,
    start: int,
    run_dir: Path,
    stream: RolloutStream,
    learners: LearnerGroup,
    inference: Any,
    val_pool: Any,
    log: RunLog,
    watchdog: Watchdog,
    release: CanaryRelease | None = None,
) -> None:
    """Steps `start + 1` .. `trainer.steps`, then the stream's close (after the last checkpoint: a resumed run
    trains what the close drops as run_ended). `version` is the policy version the learners hold: the step's
    number, the last promoted one under a canary (`release`). With K >= 1 the replicas load a step's weights
    while the next step goes on (`overlaps`), except before a validation, a checkpoint and the end."""
    overlap = OverlappedSync(learners, inference, cfg) if overlaps(cfg) and release is None else None
    clock = BusyClock(inference, lambda: stream.workers.handles)
    version = start
    for step in range(start + 1, cfg.trainer.steps + 1):
        t0 = time.perf_counter()
        batch = next_batch(stream, version, step, overlap.check if overlap else None)
        record_batch_metrics(batch.summary, run=cfg.trainer.name)
        # how each rollout ended, and every call the step used up (the ledger says which trained), before
        # the failure-rate check can stop the run
        write_parquet(batch.ended, run_dir, f"step-{step:06d}-rollouts")
        write_parquet(batch.calls_used(), run_dir, f"step-{step:06d}")
        check_failure_rate(batch.summary, cfg.rollout.max_failure_rate)
        trained_calls = select_trained_calls(batch.transitions, cfg.rollout.train_agents)
        metrics = {**rollout_metrics(batch), **staleness_metrics(trained_calls, version)}

        table, chosen = training_table(batch, cfg, stream.ledger, version)
        metrics.update(chosen)
        t1 = time.perf_counter()
        if table.num_rows:
            learned = learners.train_step(table, cfg.algorithm, cfg.inference.sampling.max_tokens)
            metrics.update(learner_metrics(learned, cfg.algorithm))
        watchdog.beat()
        t2 = time.perf_counter()
        validating = val_pool is not None and step % cfg.trainer.val_every == 0
        if release is not None:
            synced, held = release(step, stream, watchdog.beat)
            metrics.update(release.metrics())
            start_groups(cfg, stream, step)
        elif overlap is None:
            synced, held = sync_weights(learners, inference, step, cfg), step
            start_groups(cfg, stream, step)
        else:  # the row reports the sync that ended during the step: the one before, or this one below
            synced, held = overlap.start(step, lambda step=step: start_groups(cfg, stream, step)), step
            if waits_for_sync(cfg, step, validating):
                synced = overlap.finish()
        watchdog.beat()
        stream.ledger.trained(batch.records, version)
        version = held
        t3 = time.perf_counter()
        metrics.update({"time/rollout_s": t1 - t0, "time/learner_s": t2 - t1, "time/broadcast_s": t3 - t2})
        if synced:
            metrics.update(sync_metrics(synced))
        replicas = replica_counts(inference.app_name)  # `inference.autoscaling` moves them
        metrics["inference/replicas"] = replicas["running"]
        metrics["inference/replicas_target"] = replicas["target"]
        ended = stream.ledger.take_counts()
        metrics.update({f"ledger/{k}": n for k, n in ended.items()})
        metrics.update(stale_share(ended))
        metrics.update(stream.workers.metrics())

        if validating:
            metrics.update(validate(cfg, val_pool, stream.workers))
        metrics["time/step_s"] = time.perf_counter() - t0  # the checkpoint below not included
        metrics.update(busy_metrics(clock, metrics))
        end_step(cfg, step, metrics, log, watchdog, lambda s: save(run_dir, s, learners, stream.pool, stream))
    stream.close(version)


def start_groups(cfg: Config, stream: RolloutStream, step: int) -> None:
    """Once the replicas serve step `step`'s weights, groups start on them at once (none after the last step)."""
    if step < cfg.trainer.steps:
        stream.top_up(step)


def waits_for_sync(cfg: Config, step: int, validating: bool) -> bool:
    """Whether step `step` ends with every replica on its weights under `OverlappedSync`: before its validation
    (scored on them), before its checkpoint (the stream and the data position hold still while it saves), and
    at the end of the run."""
    every = cfg.trainer.checkpoint_every
    return step == cfg.trainer.steps or validating or bool(every and step % every == 0)


def end_step(
    cfg: Config,
    step: int,
    metrics: dict[str, Any],
    log: RunLog,
    watchdog: Watchdog,
    save: Callable[[int], Any],
) -> None:
    """A step's row (metrics.jsonl, Prometheus, the step line), then `save(step)` when a checkpoint is due.

    The row comes before its checkpoint: a run killed between the two resumes from the checkpoint before, which
    drops this row and runs the step again; the other way round the row would be lost."""
    record_step_metrics(step, metrics, run=cfg.trainer.name)
    log.log(step, metrics)
    print(step_line(step, cfg.trainer.steps, metrics), flush=True)
    if step == cfg.trainer.steps or (
        cfg.trainer.checkpoint_every and step % cfg.trainer.checkpoint_every == 0
    ):
        save(step)
        prune_checkpoints(log.run_dir, cfg.trainer.keep_checkpoints)
        watchdog.beat()


def progress_probes(workers: RolloutWorkers, pools: list[Any]) -> dict[str, Callable[[], Any]]:
    """What the watchdog reads: rollouts the pools saw end, and LLM calls the workers' gateways recorded."""

    def ended() -> int:
        live = [p for p in pools if p is not None]
        return sum(s["final"] for s in ray.get([p.stats.remote() for p in live], timeout=PROBE_TIMEOUT_S))

    return {"rollouts ended": ended, "LLM calls": workers.llm_calls}


def write_summary(
    run_dir: Path, end: dict[str, Any], stream: RolloutStream | None, pool: Any, workers: RolloutWorkers
) -> None:
    """RUN_DIR/summary.json: how the run ended and where every rollout it started went, also printed. A full
    disk is `RunFileWriteError`, whose message still says how the run ended."""
    summary: dict[str, Any] = {**end, "worker_restarts": workers.restarts, "worker_deaths": workers.deaths}
    summary["workers_added"], summary["workers_retired"] = workers.added, workers.retired
    checkpoint = latest_checkpoint(run_dir)
    summary["latest_checkpoint"] = str(checkpoint) if checkpoint else None
    if stream is not None:
        try:
            stats = ray.get(pool.stats.remote(), timeout=PROBE_TIMEOUT_S)
            started, leases = stats["rollouts"] + stream.restored_rollouts, stats["leases_granted"]
            acc = accounting(stream.ledger, started, leases)
            if end["status"] != "completed":  # rollouts still running at the stop run again on --resume
                acc["not_ended_at_stop"] = acc.pop("lost")
            summary["rollouts"] = acc
            print(
                accounting_line(acc)
                if "lost" in acc
                else f"run stopped: {accounting_line({**acc, 'lost': 0})}"
            )
        except Exception as e:  # the pool may be what failed; the summary is still written
            summary["rollouts"] = f"unknown: the task pool did not answer ({first_line(e)})"
    if end["status"] != "completed":
        where = f"--resume {run_dir} continues from {checkpoint.name}" if checkpoint else "no checkpoint yet"
        print(f"run stopped: {end['cause']}; {where}", flush=True)
    text = json.dumps(summary, indent=2, default=str) + "\n"
    ended = f" of a run that {end['status']}" + (f" ({end['cause']})" if end["cause"] else "")
    replace_file(run_dir / "summary.json", lambda tmp: tmp.write_text(text), f"writing the summary{ended}")


def next_batch(stream: RolloutStream, version: int, step: int, check: Callable[[], None] | None) -> Batch:
    """The stream's next batch, with a progress bar of the groups chosen (and dropped) so far."""
    dropped = 0
    with tqdm(total=stream.batch_size, desc=f"step {step} groups", leave=False, dynamic_ncols=True) as bar:

        def on_group(chosen: int, reason: str | None) -> None:
            nonlocal dropped
            dropped += reason is not None
            bar.n = chosen
            bar.set_postfix(dropped=dropped, refresh=False)
            bar.refresh()

        return stream.next_batch(version, on_group, check)


def training_table(
    batch: Batch, cfg: Config, ledger: Ledger, version: int
) -> tuple[pa.Table, dict[str, Any]]:
    """What a step trains on, and metrics of the choice: every call with its advantage, or with sft the calls of
    each group's best rollouts (`best_of_groups`, which enters the others in the ledger as dropped)."""
    if cfg.algorithm.name == "sft":
        kept, chosen = best_of_groups(batch, cfg, ledger, version)
        table = training_rows(kept, cfg)
    else:
        table, adv = compute_advantages(training_rows(batch.transitions, cfg), cfg.algorithm)
        chosen = {f"advantage/{k}": v for k, v in adv.items()}
    return select_trained_calls(table, cfg.rollout.train_agents), chosen


def training_rows(transitions: pa.Table, cfg: Config) -> pa.Table:
    """One row per training sequence: each call, or with `algorithm.merge_prefix_turns` each run of calls
    that extends one conversation. Calls of untrained roles stay in until after the advantages, so their
    emitted rewards still count in their rollout's value (see `lightning_ray.data.merge`)."""
    return merge_prefix_turns(transitions) if cfg.algorithm.merge_prefix_turns else transitions


def validate(cfg: Config, val_pool: Any, workers: RolloutWorkers) -> dict[str, float]:
    """The split's first `trainer.val_limit` held-out tasks (all when unset), the same ones each time, one greedy
    rollout each; solved when the reward reaches `trainer.success_threshold`."""
    batch = first_tasks(val_pool, workers, cfg.trainer.val_limit, {"temperature": 0.0}, "validation")
    return {f"val/{k}": v for k, v in held_out_scores(batch, cfg.trainer.success_threshold).items()}


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def save(run_dir: Path, step: int, learners: LearnerGroup, pool: Any, stream: RolloutStream) -> Path:
    """HF folder + optimizer state, with the step, the task pool's data position and the stream's groups (the
    stream's files first: the learners write the manifest that makes the checkpoint complete last). A save
    that fails leaves no folder behind (`writing_checkpoint`)."""
    path = checkpoint_dir(run_dir, step)
    with writing_checkpoint(path):
        in_flight = stream.save(path / STREAM_DIR)["in_flight"]
        state = get(pool.state.remote(), "task pool state", PROBE_TIMEOUT_S, lost=TaskPoolLost)
        return learners.save_checkpoint(path, extra={"step": step, "pool": state, "in_flight": in_flight})


def restore(
    cfg: Config, plan: ResumePlan, learners: LearnerGroup, pool: Any, inference: Any
) -> tuple[int, SavedStream]:
    """Weights, optimizer, data position and policy version from the checkpoint `plan` chose (the newest
    complete one); returns its step and the stream it saved (`RolloutStream.save`)."""
    path = plan.checkpoint
    extra = learners.load_checkpoint(path)["extra"]
    if "pool" in extra:  # an SFT run from files samples nothing, so saves no data position
        get(pool.load_state.remote(extra["pool"]), "task pool load_state", PROBE_TIMEOUT_S, lost=TaskPoolLost)
    sync_weights(learners, inference, extra["step"], cfg)
    print(f"resumed from {path} at step {extra['step']}")
    return int(extra["step"]), load_stream(path / STREAM_DIR, extra.get("in_flight", []))
