"""Streaming batches of the plain TaskPool (no Ray): open, add groups, take complete ones, forget, close."""

from __future__ import annotations

import json

import pytest

from lightning_ray.tasks import FINAL_STATUSES, Lease, Task, TaskPool


def tasks(n: int) -> list[Task]:
    return [Task(f"t{i}", {"id": f"t{i}", "q": i}) for i in range(n)]


def succeed(pool: TaskPool, leases: list[Lease]) -> None:
    for x in leases:
        assert pool.complete(x.rollout_id, x.attempt, "succeeded", reward=1.0) == "accepted"


def by_group(leases: list[Lease]) -> dict[str, list[Lease]]:
    out: dict[str, list[Lease]] = {}
    for x in leases:
        out.setdefault(x.group_id, []).append(x)
    return out


def test_groups_come_out_in_completion_order_and_once():
    pool = TaskPool(tasks(5), group_size=2, shuffle=False)
    batch = pool.open_batch()
    assert not pool.batch_done(batch) and pool.take_groups(batch) == []
    first, second, third = pool.add_groups(batch, 3)
    assert [g["task_id"] for g in pool.groups(batch)] == ["t0", "t1", "t2"]
    leases = by_group(pool.lease("w", 100))
    succeed(pool, leases[third])
    succeed(pool, leases[first][:1])  # half a group is not complete
    succeed(pool, leases[first][1:])
    [running] = pool.open_groups(batch)
    assert (running["group_id"], running["task_id"], running["records"]) == (second, "t1", [])
    assert [g["group_id"] for g in pool.take_groups(batch, 1)] == [third]
    [taken] = pool.take_groups(batch, None)
    assert (taken["group_id"], taken["task_id"]) == (first, "t0")
    assert [r.index_in_group for r in taken["records"]] == [0, 1]
    assert all(r.status == "succeeded" and r.group_id == first for r in taken["records"])
    assert pool.take_groups(batch) == []  # taken once
    succeed(pool, leases[second])
    assert [g["group_id"] for g in pool.take_groups(batch)] == [second]
    assert not pool.batch_done(batch)  # every group complete, but the batch is open
    with pytest.raises(ValueError, match="max_n"):
        pool.take_groups(batch, 0)


def test_forget_groups_drops_only_complete_groups():
    pool = TaskPool(tasks(4), group_size=2, shuffle=False)
    batch = pool.open_batch()
    done, running = pool.add_groups(batch, 2)
    leases = by_group(pool.lease("w", 100))
    succeed(pool, leases[done])
    with pytest.raises(ValueError, match="unfinished"):
        pool.forget_groups(batch, [done, running])
    pool.forget_groups(batch, [done])  # complete, not even taken: it leaves the completion queue too
    assert pool.take_groups(batch) == [] and [g["group_id"] for g in pool.groups(batch)] == [running]
    assert pool.stats(batch)["rollouts"] == 2 and pool.stats()["succeeded"] == 2  # cumulative counts stay
    pool.forget_groups(batch, [done, "g-from-another-pool"])  # nothing to drop: skipped
    assert [g["group_id"] for g in pool.groups(batch)] == [running]
    x = leases[done][0]
    assert pool.complete(x.rollout_id, x.attempt, "succeeded") == "unknown"


def test_add_groups_reruns_tasks_by_id_without_moving_the_position():
    pool = TaskPool(tasks(5), group_size=1, shuffle=False)
    batch = pool.open_batch(group_size=3)
    pool.add_groups(batch, 2)
    before = pool.state()
    again = pool.add_groups(batch, 0, ["t0", "t4"])
    assert pool.state() == before and len(again) == 2
    pool.add_groups(batch, 1, ["t1"])
    assert [g["task_id"] for g in pool.groups(batch)] == ["t0", "t1", "t0", "t4", "t1", "t2"]
    assert {len(g["rollout_ids"]) for g in pool.groups(batch)} == {3}  # the batch's group size
    with pytest.raises(KeyError, match="'nope'"):
        pool.add_groups(batch, 1, ["t2", "nope"])
    assert len(pool.groups(batch)) == 6  # nothing added by a call that failed
    with pytest.raises(KeyError, match="unknown batch"):
        pool.add_groups("b-missing", 1)
    pool.close_batch(batch, "stop")
    with pytest.raises(ValueError, match="closed"):
        pool.add_groups(batch, 1)


def test_streams_draw_exactly_where_start_batch_would_and_resume_exactly():
    def draws(pool: TaskPool, batch: str, sizes: list[int]) -> list[str]:
        ids = [gid for n in sizes for gid in pool.add_groups(batch, n)]
        names = {g["group_id"]: g["task_id"] for g in pool.groups(batch)}
        return [names[gid] for gid in ids]

    plain = TaskPool(tasks(7), seed=5)
    expected = [g["task_id"] for g in plain.groups(plain.start_batch(16))]
    original = TaskPool(tasks(7), seed=5)
    stream = original.open_batch()
    head = draws(original, stream, [3, 2])
    saved = json.loads(json.dumps(original.state()))
    tail = draws(original, stream, [4, 7])
    assert head + tail == expected
    resumed = TaskPool(tasks(7), seed=5)
    resumed.load_state(saved)
    assert draws(resumed, resumed.open_batch(), [1, 10]) == tail


def test_close_abandons_queued_lets_leased_finish_and_completes_the_groups():
    pool = TaskPool(tasks(4), group_size=2, shuffle=False)
    batch = pool.open_batch()
    leased, half, queued = pool.add_groups(batch, 3)
    leases = pool.lease("w", 3)  # all of `leased` and one of `half`
    assert {x.group_id for x in leases} == {leased, half}
    assert pool.close_batch(batch, "run ended") == 3
    assert [g["group_id"] for g in pool.take_groups(batch)] == [queued]
    assert not pool.batch_done(batch)  # leased rollouts run to their end
    assert pool.lease("w", 10) == []
    succeed(pool, leases)
    assert pool.batch_done(batch)
    taken = {g["group_id"]: g["records"] for g in pool.take_groups(batch)}
    assert list(taken) == [leased, half]  # completion order
    assert [r.status for r in taken[half]] == ["succeeded", "abandoned"]
    assert taken[half][1].failure == {"reason": "run ended"}
    assert pool.close_batch(batch, "again") == 0
    stats = pool.stats()
    assert (stats["batches_done"], stats["groups_done"], stats["abandoned"]) == (1, 3, 3)
    pool.forget_batch(batch)


def test_a_closed_batch_with_nothing_left_is_done_at_once_and_forget_needs_it_done():
    pool = TaskPool(tasks(2), group_size=1)
    batch = pool.open_batch()
    with pytest.raises(ValueError, match="still open; close or cancel it first"):
        pool.forget_batch(batch)
    assert pool.close_batch(batch) == 0 and pool.batch_done(batch)
    assert pool.stats()["batches_done"] == 1
    pool.forget_batch(batch)


def test_a_group_with_failed_and_abandoned_rollouts_still_completes():
    pool = TaskPool(tasks(2), group_size=3, max_attempts=1, lease_timeout_s=10, shuffle=False)
    batch = pool.open_batch()
    [group] = pool.add_groups(batch, 1)
    ok, bad, lost = pool.lease("w", 3, now=0.0)
    assert pool.complete(ok.rollout_id, ok.attempt, "succeeded", reward=1.0) == "accepted"
    assert pool.complete(bad.rollout_id, bad.attempt, "failed", kind="agent_exception") == "accepted"
    assert pool.take_groups(batch) == []
    assert pool.expire_leases(now=11.0) == [lost.rollout_id]  # its one attempt used: abandoned
    [taken] = pool.take_groups(batch)
    assert taken["group_id"] == group
    assert [r.status for r in taken["records"]] == ["succeeded", "failed", "abandoned"]
    assert all(r.status in FINAL_STATUSES for r in taken["records"]) and pool.open_groups(batch) == []


def test_cancel_closes_a_stream_and_start_batch_groups_can_be_taken_too():
    pool = TaskPool(tasks(3), group_size=2, shuffle=False)
    stream = pool.open_batch()
    pool.add_groups(stream, 2)
    pool.lease("w", 1)
    assert pool.cancel_batch(stream, "stopped") == 4 and pool.batch_done(stream)
    assert len(pool.take_groups(stream)) == 2
    plain = pool.start_batch(1)
    succeed(pool, pool.lease("w", 2))
    assert pool.batch_done(plain) and [g["task_id"] for g in pool.take_groups(plain)] == ["t2"]


def test_a_resumed_group_runs_only_its_missing_rollouts_under_its_own_id():
    pool = TaskPool(tasks(3), group_size=4, shuffle=False)
    batch = pool.open_batch()
    [group] = pool.add_groups(batch, 1)
    leases = pool.lease("w", 100)
    succeed(pool, [leases[0], leases[2]])
    [running] = pool.open_groups(batch)  # what a checkpoint saves
    assert [r.index_in_group for r in running["records"]] == [0, 2]

    resumed = TaskPool(tasks(3), group_size=4, shuffle=False)  # the pool of the resumed run
    b = resumed.open_batch()
    resumed.resume_group(b, group, "t0", [1, 3])
    again = resumed.lease("w", 100)
    assert [(x.group_id, x.index_in_group, x.task_id) for x in again] == [(group, 1, "t0"), (group, 3, "t0")]
    assert resumed.state() == pool.state() | {"cursor": 0}  # the data position does not move
    succeed(resumed, again)
    [taken] = resumed.take_groups(b)
    assert taken["group_id"] == group and [r.index_in_group for r in taken["records"]] == [1, 3]
    with pytest.raises(ValueError, match="cannot resume"):
        resumed.resume_group(b, "g-x", "t0", [4])
    with pytest.raises(KeyError, match="t9"):
        resumed.resume_group(b, "g-y", "t9", [0])


def test_rewind_draws_the_first_tasks_again():
    pool = TaskPool(tasks(5), group_size=1, shuffle=False)
    first = pool.start_batch(3)
    pool.rewind()
    again = pool.start_batch(3)
    assert [g["task_id"] for g in pool.groups(first)] == [g["task_id"] for g in pool.groups(again)]
