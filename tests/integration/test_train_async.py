"""The asynchronous pipeline on the real stack with the tiny model: staleness bound, accounting, faults, resume.

Every test trains a few GRPO steps with `trainer.max_staleness` K and then reads what the run left: the
trajectories trained at each step (their per-token policy versions), the ledger of every rollout the stream
started, and the pool's records.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
from test_train_loop import loop_config

from lightning_ray.loop import train
from lightning_ray.monitor.run_log import read_metrics
from lightning_ray.monitor.staleness import token_versions
from lightning_ray.names import worker_prefix
from lightning_ray.rollouts.ledger import Ledger, read_ledger
from lightning_ray.rollouts.stream import RolloutStream
from lightning_ray.rollouts.supervisor import RolloutWorkers
from lightning_ray.tasks.actor import task_pool_from_config


def async_config(tiny_config, tmp_path, steps: int, staleness: int):
    cfg = loop_config(tiny_config, tmp_path, steps)
    cfg.rollout.agent = "tests.agents:waiting_agent"
    cfg.trainer.max_staleness = staleness
    cfg.trainer.val_every = 0
    cfg.algorithm.old_logprobs = "decoupled" if staleness else "recompute"
    return cfg


def run_dir_of(tmp_path: Path) -> Path:
    [run_dir] = list((tmp_path / "runs" / "loop").iterdir())
    return run_dir


def trained_versions(run_dir: Path, step: int) -> np.ndarray:
    """The versions of the tokens step `step` trained (its Parquet also holds the groups it dropped)."""
    trained = {e["rollout_id"] for e in read_ledger(run_dir / "ledger.jsonl") if e["outcome"] == "trained"}
    table = pq.read_table(run_dir / "trajectories" / f"step-{step:06d}.parquet")
    return token_versions(table.filter(pc.is_in(table["rollout_id"], pa.array(sorted(trained), pa.string()))))


def assert_every_rollout_ends_once(run_dir: Path, steps: int, tasks_per_step: int, staleness: int) -> None:
    """Each rollout in the ledger once; every trained one in exactly one step's trajectories (which hold the
    groups each step used up, trained or not); each step used up
    `tasks_per_step` groups (K = 0, zero-variance ones among them) or trained that many (K >= 1: replaced)."""
    ledger = read_ledger(run_dir / "ledger.jsonl")
    ids = [e["rollout_id"] for e in ledger]
    assert len(ids) == len(set(ids)), "a rollout entered the ledger twice"
    assert {e["outcome"] for e in ledger} <= {"trained", "dropped", "failed"}
    trained = {e["rollout_id"] for e in ledger if e["outcome"] == "trained"}
    in_steps = Counter()
    for step in range(1, steps + 1):
        table = pq.read_table(run_dir / "trajectories" / f"step-{step:06d}.parquet")
        in_steps.update(set(table["rollout_id"].to_pylist()))
    assert all(n == 1 for n in in_steps.values()), "a rollout was used up by two steps"
    assert trained <= set(in_steps)
    trained_groups = {e["group_id"] for e in ledger if e["outcome"] == "trained"}
    used_up = trained_groups | {e["group_id"] for e in ledger if e["reason"] == "zero_variance"}
    assert len(trained_groups if staleness else used_up) == steps * tasks_per_step
    assert all(e["reason"] for e in ledger if e["outcome"] != "trained"), "a drop or failure without a reason"


def train_acting_mid_run(cfg, tmp_path: Path, act: Callable[[Path], None]) -> list[dict]:
    """`train(cfg)`, calling `act(run_dir)` on a thread of its own once step 1's trajectories are written."""

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if written := list((tmp_path / "runs" / "loop").glob("*/trajectories/step-000001.parquet")):
                act(written[0].parents[1])
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rows = train(cfg)
    watcher.join()
    return rows


@pytest.mark.slow  # CI time: K = 0 trains on current-policy tokens in test_train_checkpoint_and_resume too
def test_synchronous_k0_trains_only_current_policy_tokens(inference, tiny_config, tmp_path):
    cfg = async_config(tiny_config, tmp_path, steps=3, staleness=0)
    rows = {r["step"]: r for r in train(cfg)}
    run_dir = run_dir_of(tmp_path)
    for step in (1, 2, 3):
        assert set(trained_versions(run_dir, step)) <= {step - 1}
        if trained_versions(run_dir, step).size:  # every group of a step may have had zero variance
            assert rows[step]["staleness/tokens_behind_0"] == 1.0
    assert_every_rollout_ends_once(run_dir, 3, cfg.trainer.tasks_per_step, cfg.trainer.max_staleness)


def test_k1_never_trains_a_token_older_than_one_version(inference, tiny_config, tmp_path):
    cfg = async_config(tiny_config, tmp_path, steps=4, staleness=1)
    cfg.trainer.over_provision, cfg.trainer.checkpoint_every = 0.5, 0
    rows = {r["step"]: r for r in train(cfg)}
    run_dir = run_dir_of(tmp_path)
    for step in range(1, 5):
        versions = trained_versions(run_dir, step)
        assert versions.min() >= step - 2 and versions.max() <= step - 1
        assert rows[step]["staleness/max"] <= 1
    # The replicas loaded each step's weights while the next step went on; the last step waited for its own.
    assert "sync/version" not in rows[1] and rows[2]["sync/version"] == 1 and rows[4]["sync/version"] == 4
    # Generation overlapped training: some step trained tokens of the version before its own.
    assert any(rows[s].get("staleness/tokens_behind_1", 0) > 0 for s in range(2, 5))
    assert_every_rollout_ends_once(run_dir, 4, cfg.trainer.tasks_per_step, cfg.trainer.max_staleness)
    assert rows[4]["time/inference_busy_frac"] > 0 and rows[4]["time/agents_busy_frac"] > 0
    assert all(rows[s]["inference/prompt_tokens_computed"] > 0 for s in range(1, 5))
    assert all(0 <= rows[s]["inference/prefix_cache_hit_frac"] <= 1 for s in range(1, 5))


@pytest.mark.slow  # CI time: covered by a faster test of the same part
def test_k1_run_goes_on_when_a_rollout_worker_dies(inference, tiny_config, tmp_path):
    cfg = async_config(tiny_config, tmp_path, steps=3, staleness=1)
    cfg.rollout.num_workers = 2

    def kill_a_worker(run_dir: Path) -> None:
        ray.kill(ray.get_actor(f"{worker_prefix(cfg)}-0"))  # train() gave cfg its run id

    rows = train_acting_mid_run(cfg, tmp_path, kill_a_worker)
    assert [r["step"] for r in rows] == [1, 2, 3]
    run_dir = run_dir_of(tmp_path)
    assert_every_rollout_ends_once(run_dir, 3, cfg.trainer.tasks_per_step, cfg.trainer.max_staleness)


@pytest.mark.slow  # CI time: resume mid-stream is covered by test_stream_resume and the checkpoint test
def test_k1_resume_mid_stream_loses_and_repeats_nothing(inference, tiny_config, tmp_path):
    cfg = async_config(tiny_config, tmp_path, steps=2, staleness=1)
    cfg.trainer.over_provision = 1.0  # complete, untrained groups wait in the stream at the checkpoint
    train(cfg)
    run_dir = run_dir_of(tmp_path)
    saved = run_dir / "checkpoints" / "step-000002" / "stream"
    assert saved.is_dir()
    cfg.trainer.steps = 4
    train(cfg, resume=str(run_dir))
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for step in (3, 4):
        assert trained_versions(run_dir, step).min() >= step - 2
    assert_every_rollout_ends_once(run_dir, 4, cfg.trainer.tasks_per_step, cfg.trainer.max_staleness)


def test_k1_cuts_groups_too_stale_for_any_later_batch_and_starts_their_replacements(
    inference, tiny_config, tmp_path
):
    """Groups that made a call on the version v the replicas serve and still run once the batch of v + 1 is
    taken can never be trained at K = 1: the stream ends them at once (their agents would sleep 60 s more),
    frees their workers' slots for the replacements it starts once the replicas serve a version a later batch
    accepts, and the ledger drops them as stale, not failed."""
    cfg = async_config(tiny_config, tmp_path, steps=1, staleness=1)
    tasks = tmp_path / "sleepers.jsonl"
    tasks.write_text("".join(f'{{"id": "s{i}", "mode": "sleep", "question": "q{i}?"}}\n' for i in range(6)))
    cfg.data.train, cfg.rollout.agent = (
        str(tasks),
        "tests.agents:scripted_agent",
    )  # one call, then 60 s asleep
    cfg.trainer.tasks_per_step, cfg.trainer.over_provision, cfg.algorithm.group_size = 1, 0.0, 2
    cfg.rollout.concurrency = 4
    pool = task_pool_from_config(cfg, name="pool-cut")
    workers = RolloutWorkers(cfg, pool, prefix="cut")
    v = inference.policy_version.remote().result()  # the replicas are shared: earlier tests updated them
    stream = RolloutStream(cfg, pool, workers, Ledger(tmp_path / "ledger.jsonl"), version=v)
    try:
        stream.top_up(v)  # (K + 1) * B = 2 groups, 4 rollouts: every slot of the worker
        deadline = time.monotonic() + 120
        while workers.llm_calls() < 4:  # each has made its call on version v and sleeps
            assert time.monotonic() < deadline, "the rollouts did not make their calls"
            time.sleep(0.5)
        stream.gathering(v)
        assert stream.cut_stale() == 0  # the next batch (version v + 1) may still train version-v calls
        t0 = time.monotonic()
        stream.gathering(v + 1)
        assert stream.cut_stale() == 2  # the next batch (version v + 2) may not
        stream.take_complete(None, 30.0)
        assert len(stream.ready) == 2 and time.monotonic() - t0 < 30
        # no later batch accepts a group started on version v: the replacements wait for the replicas to serve
        # v + 1, whose sync starts them (as `OverlappedSync` does once the replicas load it)
        assert stream.started == 2
        stream.top_up(v + 1)
        assert stream.started == 5  # the 2 replacements, and the group the budget of version v + 1 adds
        while ray.get(pool.stats.remote(stream.batch_id))["leased"] < 4:  # the replacements got the slots
            assert time.monotonic() - t0 < 20, "the cut rollouts kept their workers' slots (asleep)"
            time.sleep(0.2)
        for group in list(stream.ready):
            assert stream.drop_reason(group, v + 1) == "stale"
            stream.drop(group, "stale", v + 1)
        assert stream.replaced == 2  # dropping a cut group does not replace it twice
        entries = read_ledger(tmp_path / "ledger.jsonl")
        assert len(entries) == 4 and {(e["outcome"], e["reason"]) for e in entries} == {("dropped", "stale")}
    finally:
        ray.get(pool.cancel_batch.remote(stream.batch_id, "test over"))
        workers.stop()
        ray.kill(pool)
