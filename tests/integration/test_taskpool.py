"""The TaskPool actor with real Ray actors leasing from it: killed and hung workers lose nothing."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid

import pyarrow as pa
import pytest
import ray

from lightning_ray.monitor import (
    FailureRateExceeded,
    check_failure_rate,
    record_batch_metrics,
    summarize_batch,
)
from lightning_ray.tasks import FINAL_STATUSES, RolloutReport, Task, create_task_pool, get_task_pool

STATUSES = ["queued", "leased", "succeeded", "failed", "timed_out", "abandoned"]


@ray.remote(num_cpus=0.1)
class LeaseHolderActor:
    """Stands in for a rollout worker: registers with the pool (by name), leases rollouts and reports each
    after `hold_s`. With `report=False` it leases up to `max_n` and holds them without ever reporting, like a
    hung worker. Tasks whose `fail` field is true are reported as failed agent exceptions."""

    def __init__(
        self, worker_id: str, pool_name: str, report: bool = True, hold_s: float = 0.02, max_n: int = 2
    ):
        self.worker_id, self.report, self.hold_s, self.max_n = worker_id, report, hold_s, max_n
        self.pool = get_task_pool(pool_name)
        self.held: list = []
        self.reported: list[tuple[str, str]] = []
        self.errors: list[str] = []

    async def start(self) -> None:
        await self.pool.register_worker.remote(self.worker_id, ray.get_runtime_context().current_actor)
        self._loop_task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        try:
            while True:
                want = self.max_n if self.report else self.max_n - len(self.held)
                leases = await self.pool.lease.remote(self.worker_id, want) if want > 0 else []
                if not leases:
                    await asyncio.sleep(0.05)
                    continue
                if not self.report:
                    self.held.extend(leases)
                    continue
                await asyncio.gather(*(self._run(x) for x in leases))
        except Exception as e:  # surfaced through errors(); a silent dead loop would hang the test
            self.errors.append(repr(e))

    async def _run(self, lease) -> None:
        await asyncio.sleep(self.hold_s)
        if lease.task.get("fail"):
            failure = {
                "kind": "agent_exception",
                "exc_type": "KeyError",
                "message": f"'answer_{lease.task_id}'",
            }
            out = await self.pool.complete.remote(
                lease.rollout_id, lease.attempt, "failed", kind="agent_exception", failure=failure
            )
        else:
            out = await self.pool.complete.remote(
                lease.rollout_id, lease.attempt, "succeeded", reward=float(lease.index_in_group % 2)
            )
        self.reported.append((lease.rollout_id, out))

    async def num_held(self) -> int:
        return len(self.held)

    async def held_ids(self) -> list[str]:
        return [x.rollout_id for x in self.held]

    async def report_held(self) -> list[str]:
        """Report every held lease as succeeded, late; returns the pool's answers."""
        return [
            await self.pool.complete.remote(x.rollout_id, x.attempt, "succeeded", reward=1.0)
            for x in self.held
        ]

    async def num_reported(self) -> int:
        return len(self.reported)

    async def get_errors(self) -> list[str]:
        return self.errors


def _wait_for(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _adds_up(stats: dict) -> dict:
    assert stats["rollouts"] == sum(stats[k] for k in STATUSES), stats
    return stats


def _tasks(n: int, fail_every: int = 0) -> list[Task]:
    return [
        Task(f"t{i}", {"id": f"t{i}", "fail": bool(fail_every) and i % fail_every == 0}) for i in range(n)
    ]


@pytest.fixture
def pool_name():
    return f"test_pool_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def cleanup():
    actors = []
    yield actors
    for a in actors:
        ray.kill(a, no_restart=True)


def _start(cleanup, *actors):
    cleanup.extend(actors)
    ray.get([a.start.remote() for a in actors])
    return actors


def test_killing_a_worker_mid_batch_loses_nothing(ray_cluster, pool_name, cleanup):
    # A long lease timeout: only the death check can rescue the killed worker's rollouts.
    pool = create_task_pool(
        _tasks(6), name=pool_name, group_size=4, max_attempts=2, lease_timeout_s=300, check_interval_s=0.2
    )
    cleanup.append(pool)
    assert get_task_pool(pool_name)._actor_id == pool._actor_id
    batch = ray.get(pool.start_batch.remote(6))

    (doomed,) = _start(cleanup, LeaseHolderActor.remote("doomed", pool_name, report=False, max_n=5))
    _wait_for(lambda: ray.get(doomed.num_held.remote()) == 5, what="the doomed worker to hold 5 leases")
    doomed_ids = set(ray.get(doomed.held_ids.remote()))
    healthy = _start(cleanup, *(LeaseHolderActor.remote(f"healthy{i}", pool_name) for i in range(2)))
    _wait_for(lambda: ray.get(pool.stats.remote(batch))["final"] >= 6, what="some rollouts to finish")
    mid = _adds_up(ray.get(pool.stats.remote(batch)))
    assert not mid["done"] and mid["leased"] >= 5

    ray.kill(doomed, no_restart=True)
    assert ray.get(pool.wait_batch.remote(batch, timeout_s=60)), ray.get(pool.stats.remote(batch))

    stats = _adds_up(ray.get(pool.stats.remote(batch)))
    assert (stats["rollouts"], stats["succeeded"], stats["final"], stats["groups_done"]) == (24, 24, 24, 6)
    results = ray.get(pool.batch_results.remote(batch))
    assert len(results) == 24 and all(r.status in FINAL_STATUSES for r in results)
    for r in results:
        if r.rollout_id in doomed_ids:
            assert r.attempts == 2 and r.worker_id.startswith("healthy"), r
            assert "worker doomed died: ActorDiedError" in r.history[0]["event"], r.history
        else:
            assert r.attempts == 1, r
    assert ray.get(pool.stats.remote())["workers_dead"] == 1
    assert all(ray.get(w.get_errors.remote()) == [] for w in healthy)
    # Every rollout was reported exactly once as accepted by the healthy workers.
    assert sum(ray.get([w.num_reported.remote() for w in healthy])) == 24


def test_hung_worker_leases_expire_and_its_late_reports_are_stale(ray_cluster, pool_name, cleanup):
    pool = create_task_pool(
        _tasks(3), name=pool_name, group_size=2, max_attempts=2, lease_timeout_s=1.0, check_interval_s=0.2
    )
    cleanup.append(pool)
    batch = ray.get(pool.start_batch.remote(3))
    (hung,) = _start(cleanup, LeaseHolderActor.remote("hung", pool_name, report=False, max_n=4))
    _wait_for(lambda: ray.get(hung.num_held.remote()) == 4, what="the hung worker to hold 4 leases")
    _start(cleanup, LeaseHolderActor.remote("healthy", pool_name))
    assert ray.get(pool.wait_batch.remote(batch, timeout_s=60))
    assert ray.get(hung.report_held.remote()) == ["stale"] * 4  # its attempts were superseded
    stats = _adds_up(ray.get(pool.stats.remote(batch)))
    assert (stats["succeeded"], stats["final"]) == (6, 6)
    results = {r.rollout_id: r for r in ray.get(pool.batch_results.remote(batch))}
    for rid in ray.get(hung.held_ids.remote()):
        assert results[rid].attempts == 2 and results[rid].history[0]["event"].startswith("lease expired")
    assert ray.get(pool.stats.remote())["workers_dead"] == 0  # slow is not dead


def _ready(ref) -> bool:
    return bool(ray.wait([ref], timeout=0)[0])


def test_idle_leases_wait_for_work_and_a_group_reports_in_one_call(ray_cluster, pool_name, cleanup):
    # A check interval longer than the test: every wake-up below comes from the pool's change event.
    pool = create_task_pool(_tasks(2), name=pool_name, group_size=2, check_interval_s=60)
    cleanup.append(pool)
    waiting = pool.lease.remote("w", 4, wait_s=60)
    time.sleep(0.5)
    assert not _ready(waiting)  # nothing queued: it waits
    batch = ray.get(pool.start_batch.remote(1))
    leases = ray.get(waiting, timeout=10)
    assert len(leases) == 2
    idle = pool.lease.remote("w2", 4, wait_s=60, batch_id=batch)
    time.sleep(0.5)
    assert not _ready(idle)

    tables = {"transitions": pa.table({"x": [1, 2]}), "rollouts": pa.table({"y": [3]})}
    reports = [RolloutReport(x.rollout_id, x.attempt, "succeeded", reward=1.0) for x in leases]
    assert ray.get(pool.report_group.remote(tables, reports)) == ["accepted", "accepted"]
    assert ray.get(idle, timeout=10) == []  # the batch is done: the idle worker is told at once
    assert ray.get(pool.batch_done.remote(batch))
    assert ray.get(pool.report_group.remote(tables, reports)) == ["duplicate", "duplicate"]
    assert ray.get(pool.lease.remote("w", 1, wait_s=0.2)) == []  # nothing came in time

    first, second = ray.get(pool.batch_results.remote(batch))
    assert first.result == second.result  # the same refs, owned by the pool
    assert ray.get(first.result["transitions"]).equals(tables["transitions"])
    assert ray.get(first.result["rollouts"]).equals(tables["rollouts"])


def test_wait_groups_wakes_on_a_complete_group_and_times_out_empty(ray_cluster, pool_name, cleanup):
    # A check interval longer than the test: every wake-up below comes from the pool's change event.
    pool = create_task_pool(_tasks(3), name=pool_name, group_size=2, shuffle=False, check_interval_s=60)
    cleanup.append(pool)
    batch = ray.get(pool.open_batch.remote())
    assert ray.get(pool.wait_groups.remote(batch, None, 0.0)) == []
    t0 = time.monotonic()
    assert ray.get(pool.wait_groups.remote(batch, None, 0.3)) == []
    assert time.monotonic() - t0 >= 0.3
    waiting = pool.wait_groups.remote(batch, 1, 60)
    [group] = ray.get(pool.add_groups.remote(batch, 1))
    first, second = ray.get(pool.lease.remote("w", 2))
    ray.get(pool.complete.remote(first.rollout_id, first.attempt, "succeeded", reward=1.0))
    time.sleep(0.5)
    assert not _ready(waiting)  # half a group is not complete
    ray.get(pool.complete.remote(second.rollout_id, second.attempt, "failed", kind="agent_exception"))
    [taken] = ray.get(waiting, timeout=10)
    assert (taken["group_id"], taken["task_id"]) == (group, "t0")
    assert [r.status for r in taken["records"]] == ["succeeded", "failed"]
    waiting = pool.wait_groups.remote(batch, None, 60)
    time.sleep(0.3)
    assert ray.get(pool.close_batch.remote(batch, "run ended")) == 0
    assert ray.get(waiting, timeout=10) == []  # done, and every group taken: no need to wait on
    assert ray.get(pool.batch_done.remote(batch))


def test_attempts_exhausted_are_abandoned_and_the_batch_still_completes(ray_cluster, pool_name, cleanup):
    pool = create_task_pool(
        _tasks(4), name=pool_name, group_size=2, max_attempts=1, lease_timeout_s=300, check_interval_s=0.2
    )
    cleanup.append(pool)
    batch = ray.get(pool.start_batch.remote(4))
    (doomed,) = _start(cleanup, LeaseHolderActor.remote("doomed", pool_name, report=False, max_n=3))
    _wait_for(lambda: ray.get(doomed.num_held.remote()) == 3, what="the doomed worker to hold 3 leases")
    ray.kill(doomed, no_restart=True)
    _start(cleanup, LeaseHolderActor.remote("healthy", pool_name))
    assert ray.get(pool.wait_batch.remote(batch, timeout_s=60))
    stats = _adds_up(ray.get(pool.stats.remote(batch)))
    assert (stats["abandoned"], stats["succeeded"], stats["done"]) == (3, 5, True)
    summary = summarize_batch(ray.get(pool.batch_results.remote(batch)))
    assert summary.failures_by_kind == {"abandoned": 3}
    assert summary.patterns[0].template.startswith("worker doomed died: ActorDiedError")


def test_resume_position_through_the_actor(ray_cluster, pool_name, cleanup):
    pool = create_task_pool(_tasks(5), name=pool_name, shuffle=True, seed=7)
    cleanup.append(pool)
    ray.get(pool.start_batch.remote(3))
    saved = ray.get(pool.state.remote())
    expected = [g["task_id"] for g in ray.get(pool.groups.remote(ray.get(pool.start_batch.remote(4))))]
    other = create_task_pool(_tasks(5), name=pool_name + "_resumed", shuffle=True, seed=7)
    cleanup.append(other)
    ray.get(other.load_state.remote(saved))
    assert [
        g["task_id"] for g in ray.get(other.groups.remote(ray.get(other.start_batch.remote(4))))
    ] == expected


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_batch_summary_stops_bad_runs_and_reaches_ray_metrics(ray_cluster, pool_name, cleanup):
    pool = create_task_pool(_tasks(4, fail_every=2), name=pool_name, group_size=2, shuffle=False)
    cleanup.append(pool)
    batch = ray.get(pool.start_batch.remote(4))
    _start(cleanup, LeaseHolderActor.remote("w", pool_name, max_n=4))
    assert ray.get(pool.wait_batch.remote(batch, timeout_s=60))
    summary = summarize_batch(ray.get(pool.batch_results.remote(batch)))
    assert (summary.num_rollouts, summary.success_rate, summary.failures_by_kind) == (
        8,
        0.5,
        {"agent_exception": 4},
    )
    assert summary.patterns[0].count == 4  # 'answer_t0' and 'answer_t2' share one template
    check_failure_rate(summary, 0.5)
    with pytest.raises(FailureRateExceeded, match=r"4x KeyError: <str>"):
        check_failure_rate(summary, 0.25)

    run = f"test-{uuid.uuid4().hex[:6]}"
    record_batch_metrics(summary, run=run)
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = {
        "ray_lightning_ray_batch_success_rate": 0.5,
        "ray_lightning_ray_rollout_failures_total": 4.0,
        "ray_lightning_ray_rollouts_total": 4.0,
    }
    found: dict[str, float] = {}

    def exported() -> bool:
        for line in _scrape(port).splitlines():
            name = line.split("{", 1)[0]
            if name in wanted and f'run="{run}"' in line:
                found[name] = float(line.rsplit(" ", 1)[1])
        return found.keys() == wanted.keys()

    _wait_for(exported, timeout_s=60, what="the metrics to be exported")
    assert found == wanted


def test_pools_from_the_run_config(ray_cluster, tmp_path, cleanup):
    from lightning_ray.config import load_config
    from lightning_ray.tasks import task_pool_from_config

    (tmp_path / "train.jsonl").write_text("".join(f'{{"id": "q{i}"}}\n' for i in range(5)))
    (tmp_path / "val.jsonl").write_text('{"id": "v0"}\n{"id": "v1"}\n')
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("data: {train: train.jsonl, val: val.jsonl, seed: 5}\nalgorithm: {group_size: 3}\n")
    cfg = load_config(cfg_file, check_files=False)
    name = f"cfg_{uuid.uuid4().hex[:6]}"
    train = task_pool_from_config(cfg, "train", name=name + "_train")
    val = task_pool_from_config(cfg, "val", name=name + "_val")
    cleanup.extend([train, val])
    batch = ray.get(train.start_batch.remote(2))
    assert _adds_up(ray.get(train.stats.remote(batch)))["rollouts"] == 6  # algorithm.group_size
    leases = ray.get(train.lease.remote("w", 1))
    assert ray.get(train.state.remote())["seed"] == 5 and leases[0].group_size == 3
    vb = ray.get(val.start_batch.remote(2, 1))
    assert [g["task_id"] for g in ray.get(val.groups.remote(vb))] == ["v0", "v1"]  # validation: file order
