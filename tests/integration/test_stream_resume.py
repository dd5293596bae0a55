"""A checkpoint taken while GRPO groups run keeps the rollouts they finished: the resumed stream runs only the
missing ones, under the same group ids, and trains each group whole (real pool, workers, vLLM, tiny model)."""

from __future__ import annotations

import json
import time

import pyarrow.compute as pc
import ray

from lightning_ray.rollouts.ledger import Ledger
from lightning_ray.rollouts.stream import RolloutStream, load_stream
from lightning_ray.rollouts.supervisor import RolloutWorkers
from lightning_ray.tasks.actor import task_pool_from_config

GROUP_SIZE, GROUPS = 4, 2


def start(cfg, tmp_path, name: str):
    pool = task_pool_from_config(cfg, name=f"pool-{name}")
    workers = RolloutWorkers(cfg, pool, prefix=name)
    return pool, workers, RolloutStream(cfg, pool, workers, Ledger(tmp_path / f"{name}.jsonl"), version=0)


def kill(pool, workers) -> None:
    """What a preempted driver leaves: nothing stopped cleanly."""
    for w in workers.handles:
        ray.kill(w)
    ray.kill(pool)


def test_a_resumed_stream_runs_only_the_missing_rollouts_of_running_groups(inference, tiny_config, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    data = tmp_path / "tasks.jsonl"
    rows = [
        {"id": f"t{i}", "question": f"What is {i} + 1?", "gate": str(gate), "group_size": GROUP_SIZE}
        for i in range(6)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config.model_copy(deep=True)
    cfg.data.train = str(data)
    cfg.rollout.agent = "tests.fault_agents:holds_the_last_rollout_of_each_group"
    cfg.rollout.num_workers, cfg.rollout.concurrency = 1, 8
    cfg.rollout.lease_timeout_s = 3.0  # renewals every second: finished rollouts of running groups go out
    cfg.algorithm.group_size, cfg.algorithm.drop_zero_variance = GROUP_SIZE, False
    cfg.trainer.tasks_per_step, cfg.trainer.max_staleness = GROUPS, 0

    pool, workers, stream = start(cfg, tmp_path, "before")
    try:
        stream.top_up(0)
        deadline = time.monotonic() + 120
        while [len(g["records"]) for g in ray.get(pool.open_groups.remote(stream.batch_id))] != [3] * GROUPS:
            assert time.monotonic() < deadline, ray.get(pool.stats.remote())
            time.sleep(0.2)
        in_flight = stream.save(tmp_path / "stream")["in_flight"]
        position = ray.get(pool.state.remote())
    finally:
        kill(pool, workers)
    assert in_flight == []  # no group runs whole again
    saved = load_stream(tmp_path / "stream", in_flight)
    assert [len(g.records) for g in saved.partial] == [3] * GROUPS and saved.ready == []
    finished = {r.rollout_id for g in saved.partial for r in g.records}

    pool, workers, stream = start(cfg, tmp_path, "after")
    try:
        ray.get(pool.load_state.remote(position))
        stream.resume(saved)
        batch = stream.next_batch(0)
        stats = ray.get(pool.stats.remote())
    finally:
        (gate / "open").touch()
        kill(pool, workers)
    assert stats["rollouts"] == GROUPS  # one missing rollout per group ran, nothing else
    assert len(batch.records) == GROUPS * GROUP_SIZE
    assert finished < {r.rollout_id for r in batch.records}
    by_group: dict[str, list[int]] = {}
    for r in batch.records:
        by_group.setdefault(r.group_id, []).append(r.index_in_group)
    assert by_group == {g.group_id: list(range(GROUP_SIZE)) for g in saved.partial}
    counts = pc.value_counts(batch.transitions["group_id"]).to_pylist()
    assert (
        sorted(c["counts"] for c in counts) == [GROUP_SIZE] * GROUPS
    )  # one call per rollout, one group each
    assert stream.restored_rollouts == 3 * GROUPS
