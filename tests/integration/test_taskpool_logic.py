"""TaskPool logic without Ray: datasets, groups, leases, retries, final states, resume. Fast, no cluster."""

from __future__ import annotations

import json
import random
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_ray.monitor.summary import summarize_batch
from lightning_ray.rollouts.ledger import Ledger, read_ledger
from lightning_ray.rollouts.stream import ran
from lightning_ray.tasks import (
    FINAL_STATUSES,
    DatasetError,
    RolloutReport,
    Task,
    TaskPool,
    WorkerDeadError,
    load_tasks,
)
from lightning_ray.tasks.records import cut_reason

STATUSES = ["queued", "leased", "succeeded", "failed", "timed_out", "abandoned"]


def assert_adds_up(pool: TaskPool, batch_id: str | None = None) -> dict:
    s = pool.stats(batch_id)
    assert s["rollouts"] == sum(s[k] for k in STATUSES), s
    assert s["final"] == sum(s[k] for k in ("succeeded", "failed", "timed_out", "abandoned")), s
    return s


def tasks(n: int) -> list[Task]:
    return [Task(f"t{i}", {"id": f"t{i}", "q": i}) for i in range(n)]


# ---- datasets --------------------------------------------------------------------------------------------


def test_jsonl_ids_from_field_or_row_index(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"id": "a", "q": 1}\n\n{"q": 2}\n{"id": 7, "q": 3}\n')
    got = load_tasks(p)
    assert [(t.task_id, t.data["q"]) for t in got] == [("a", 1), ("1", 2), ("7", 3)]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"q": 1}\n{"q": 2\n', r"d\.jsonl:2: not valid JSON"),
        ('{"q": 1}\n\n[1, 2]\n', r"d\.jsonl:3: each line must be a JSON object"),
        ('{"id": "x"}\n{"id": "y"}\n{"id": "x"}\n', r"d\.jsonl:3: task id 'x' already used at .*d\.jsonl:1"),
        ('{"id": ["x"]}\n', r"d\.jsonl:1: field 'id' must be a string or an integer"),
        ('{"id": 1.5}\n', r"d\.jsonl:1: field 'id'"),
        ("\n\n", r"d\.jsonl: the dataset has no rows"),
    ],
)
def test_jsonl_bad_rows_name_file_and_line(tmp_path, text, match):
    p = tmp_path / "d.jsonl"
    p.write_text(text)
    with pytest.raises(DatasetError, match=match):
        load_tasks(p)


def test_parquet(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": ["x", None, "z"], "q": [1, 2, 3]}), p)
    assert [(t.task_id, t.data["q"]) for t in load_tasks(p)] == [("x", 1), ("1", 2), ("z", 3)]
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match=r"bad\.parquet: not a readable Parquet file"):
        load_tasks(bad)
    for missing, match in [
        (tmp_path / "nope.jsonl", "dataset not found"),
        (tmp_path / "d.csv", "unknown dataset format"),
    ]:
        if missing.suffix == ".csv":
            missing.write_text("a,b\n")
        with pytest.raises(DatasetError, match=match):
            load_tasks(missing)


def _save_like_hf(directory, shards: list[pa.Table]) -> None:
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow IPC *stream* shards + two JSON files."""
    directory.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for name, table in zip(names, shards, strict=True):
        with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (directory / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": n} for n in names], "_fingerprint": "f", "_split": "train"})
    )
    (directory / "dataset_info.json").write_text(json.dumps({"features": {}}))


def test_hf_saved_dataset_directory(tmp_path):
    d = tmp_path / "saved" / "train"
    _save_like_hf(d, [pa.table({"question": ["1+1", "2+2"]}), pa.table({"question": ["3+3"]})])
    got = load_tasks(d)
    assert [(t.task_id, t.data["question"]) for t in got] == [("0", "1+1"), ("1", "2+2"), ("2", "3+3")]
    (tmp_path / "saved" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(DatasetError, match=r"DatasetDict with splits \['train'\].*saved/train"):
        load_tasks(tmp_path / "saved")
    (d / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(DatasetError, match=r"data-00001-of-00002\.arrow: listed in state\.json but missing"):
        load_tasks(d)


# ---- groups, leases, reports -----------------------------------------------------------------------------


def test_batches_are_groups_of_g_with_unguessable_ids():
    pool = TaskPool(tasks(5), group_size=4, shuffle=False)
    batch = pool.start_batch(3)
    groups = pool.groups(batch)
    assert len(groups) == 3 and [g["task_id"] for g in groups] == ["t0", "t1", "t2"]
    leases = pool.lease("w1", 100)
    assert len(leases) == 12 and len({x.rollout_id for x in leases}) == 12
    assert all(len(x.rollout_id) >= 22 for x in leases)  # secrets.token_urlsafe(16)
    by_group = Counter(x.group_id for x in leases)
    assert set(by_group.values()) == {4}
    assert {(x.group_size, x.attempt, x.batch_id) for x in leases} == {(4, 1, batch)}
    assert [x.index_in_group for x in leases[:4]] == [0, 1, 2, 3] and leases[0].task == {"id": "t0", "q": 0}
    assert pool.start_batch(1, group_size=1) != batch and pool.stats()["rollouts"] == 13


def test_group_order_numbers_groups_as_queued_across_batches_and_retries():
    """`Lease.group_order`, the engine priority of a rollout's calls, is its group's place in the order the pool
    queued groups: one number for every rollout of a group, its attempts again included."""
    pool = TaskPool(tasks(5), group_size=2, shuffle=False, max_attempts=2)
    stream = pool.open_batch()
    pool.add_groups(stream, 2)
    pool.start_batch(1)
    pool.add_groups(stream, 1)
    leases = pool.lease("w1", 100)
    order = {x.group_id: x.group_order for x in leases}
    assert sorted(order.values()) == [0, 1, 2, 3] and len(leases) == 8
    assert all(x.group_order == order[x.group_id] for x in leases)
    first = leases[0]
    pool.complete(first.rollout_id, first.attempt, "failed", kind="llm_error", retry=True)
    (again,) = pool.lease("w1", 100)
    assert (again.rollout_id, again.attempt, again.group_order) == (first.rollout_id, 2, first.group_order)


def test_complete_is_idempotent_and_ignores_stale_attempts():
    pool = TaskPool(tasks(1), group_size=1, max_attempts=3, lease_timeout_s=10)
    batch = pool.start_batch(1)
    (first,) = pool.lease("w1", 1, now=0.0)
    assert pool.expire_leases(now=11.0) == [first.rollout_id]
    (second,) = pool.lease("w2", 1, now=11.0)
    assert (second.rollout_id, second.attempt) == (first.rollout_id, 2)
    assert pool.complete(first.rollout_id, 1, "succeeded", reward=1.0) == "stale"
    assert (
        pool.complete(second.rollout_id, 2, "failed", kind="agent_exception", failure={"kind": "x"})
        == "accepted"
    )
    assert pool.complete(second.rollout_id, 2, "failed", kind="agent_exception") == "duplicate"
    assert pool.complete(second.rollout_id, 2, "succeeded", reward=1.0) == "duplicate"
    assert pool.complete(first.rollout_id, 1, "succeeded") == "stale"
    assert pool.complete("nope", 1, "succeeded") == "unknown"
    (r,) = pool.batch_results(batch)
    assert (r.status, r.kind, r.attempts, r.worker_id, r.reward) == (
        "failed",
        "agent_exception",
        2,
        "w2",
        None,
    )
    assert [h["event"].split(" (")[0] for h in r.history] == ["lease expired", "reported failed"]
    with pytest.raises(ValueError, match="needs a kind"):
        pool.complete(second.rollout_id, 2, "failed")
    with pytest.raises(ValueError):
        pool.complete(second.rollout_id, 2, "abandoned")


def test_a_group_report_completes_each_rollout_like_complete():
    pool = TaskPool(tasks(1), group_size=3, max_attempts=2, lease_timeout_s=10)
    batch = pool.start_batch(1)
    a, b, c = pool.lease("w1", 3, now=0.0)
    pool.renew("w1", [(a.rollout_id, 1), (b.rollout_id, 1)], now=5.0)
    assert pool.expire_leases(now=11.0) == [c.rollout_id]
    (c2,) = pool.lease("w2", 3, now=11.0)
    failure = {"kind": "tool_error", "message": "no calculator"}
    reports = [
        RolloutReport(a.rollout_id, 1, "succeeded", reward=1.0),
        RolloutReport(b.rollout_id, 1, "failed", kind="tool_error", failure=failure),
        RolloutReport(c.rollout_id, 1, "succeeded", reward=1.0),  # superseded by attempt 2
    ]
    tables = {"transitions": "ref-t", "rollouts": "ref-r"}
    assert pool.complete_all(reports, result=tables) == ["accepted", "accepted", "stale"]
    assert pool.complete_all(reports[:2], result={"other": 1}) == ["duplicate", "duplicate"]
    assert pool.complete_all([RolloutReport(c2.rollout_id, 2, "timed_out")]) == ["accepted"]
    records = {r.rollout_id: r for r in pool.batch_results(batch)}
    assert records[a.rollout_id].result is records[b.rollout_id].result is tables
    assert (records[b.rollout_id].kind, records[b.rollout_id].failure) == ("tool_error", failure)
    assert (records[c.rollout_id].status, records[c.rollout_id].result) == ("timed_out", None)
    assert pool.batch_done(batch)


def test_expired_leases_requeue_first_then_abandon():
    pool = TaskPool(tasks(3), group_size=1, max_attempts=2, lease_timeout_s=5, shuffle=False)
    batch = pool.start_batch(3)
    (a,) = pool.lease("w1", 1, now=0.0)
    pool.expire_leases(now=6.0)
    # The expired rollout goes to the front of the queue.
    assert [x.rollout_id for x in pool.lease("w2", 1, now=6.0)] == [a.rollout_id]
    pool.expire_leases(now=12.0)
    assert assert_adds_up(pool, batch)["abandoned"] == 1
    (r,) = [r for r in pool.batch_results(batch) if r.rollout_id == a.rollout_id]
    assert r.status == "abandoned" and "all 2 attempts used" in r.failure["reason"] and r.attempts == 2
    # A late report of the last attempt cannot resurrect it: exactly one final state.
    assert pool.complete(a.rollout_id, 2, "succeeded", reward=1.0) == "stale"


def test_late_report_of_a_revoked_but_not_yet_reissued_attempt_is_kept():
    pool = TaskPool(tasks(1), group_size=1, max_attempts=2, lease_timeout_s=5)
    batch = pool.start_batch(1)
    (a,) = pool.lease("w1", 1, now=0.0)
    pool.expire_leases(now=6.0)
    assert pool.stats(batch)["queued"] == 1
    assert pool.complete(a.rollout_id, 1, "succeeded", reward=0.5) == "accepted"
    assert pool.lease("w2", 5) == [] and pool.batch_done(batch)
    assert pool.batch_results(batch)[0].reward == 0.5


def test_dead_worker_leases_are_requeued_and_it_gets_no_more_work():
    pool = TaskPool(tasks(2), group_size=2, max_attempts=2)
    batch = pool.start_batch(2)
    pool.register_worker("w1", handle="h1")
    pool.register_worker("w2", handle="h2")
    held = {x.rollout_id for x in pool.lease("w1", 3)}
    pool.lease("w2", 1)
    assert set(pool.report_worker_dead("w1", "ActorDiedError")) == held
    assert pool.report_worker_dead("w1") == []  # once
    assert pool.worker_handles() == {"w2": "h2"}
    s = assert_adds_up(pool, batch)
    assert (s["queued"], s["leased"]) == (3, 1)
    with pytest.raises(WorkerDeadError):
        pool.lease("w1", 1)
    with pytest.raises(WorkerDeadError):
        pool.register_worker("w1")
    again = pool.lease("w2", 10)
    assert {x.rollout_id for x in again} == held and {x.attempt for x in again} == {2}
    assert pool.stats()["workers_dead"] == 1


def test_retry_requeues_until_attempts_run_out():
    pool = TaskPool(tasks(1), group_size=1, max_attempts=2)
    batch = pool.start_batch(1)
    (a,) = pool.lease("w", 1)
    assert pool.complete(a.rollout_id, 1, "failed", kind="llm_error", retry=True) == "requeued"
    (b,) = pool.lease("w", 1)
    assert pool.complete(b.rollout_id, 2, "timed_out", retry=True) == "accepted"
    (r,) = pool.batch_results(batch)
    assert (r.status, r.kind, r.attempts) == ("timed_out", "timeout", 2)
    assert r.history[0]["event"] == "reported failed (llm_error)"


def test_renew_extends_only_live_leases():
    pool = TaskPool(tasks(2), group_size=1, lease_timeout_s=10)
    pool.start_batch(2)
    a, b = pool.lease("w", 2, now=0.0)
    pool.complete(b.rollout_id, 1, "succeeded", reward=1.0)
    assert pool.renew("w", [(a.rollout_id, 1), (b.rollout_id, 1), (a.rollout_id, 9)], now=8.0) == [
        a.rollout_id
    ]
    assert pool.expire_leases(now=15.0) == []  # renewed at 8 -> deadline 18
    assert pool.expire_leases(now=19.0) == [a.rollout_id]
    assert pool.renew("w", [(a.rollout_id, 1)], now=19.0) == []


def test_cancel_and_forget_keep_cumulative_counts():
    pool = TaskPool(tasks(3), group_size=2)
    b1 = pool.start_batch(3)
    for x in pool.lease("w", 2):
        pool.complete(x.rollout_id, x.attempt, "succeeded", reward=1.0)
    with pytest.raises(ValueError, match="cancel it first"):
        pool.forget_batch(b1)
    assert pool.cancel_batch(b1, "run stopped") == 4 and pool.batch_done(b1)
    assert pool.lease("w", 10) == []  # cancelled rollouts are no longer handed out
    pool.forget_batch(b1)
    with pytest.raises(KeyError, match="unknown batch"):
        pool.batch_done(b1)
    s = assert_adds_up(pool)
    assert (s["rollouts"], s["succeeded"], s["abandoned"], s["batches_done"], s["groups_done"]) == (
        6,
        2,
        4,
        1,
        3,
    )


def test_cut_groups_end_now_as_dropped_not_failed(tmp_path):
    pool = TaskPool(tasks(3), group_size=3, lease_timeout_s=10)
    batch = pool.open_batch()
    g1, g2, g3 = pool.add_groups(batch, 3)
    leased = pool.lease("w", 5, now=0.0)  # g1's three rollouts and two of g2's
    for x in leased[:4]:
        pool.complete(x.rollout_id, x.attempt, "succeeded", reward=1.0)
    # g1 is complete (left alone); g2 has one ended, one running, one queued; g3 has not started.
    assert pool.cut_groups(batch, [g1, g2, g3, g2, "nope"], "stale", "a call older than v1") == [g2, g3]
    assert [g["group_id"] for g in pool.take_groups(batch)] == [g1, g2, g3]
    assert pool.lease("w", 10) == []  # nothing of theirs is handed out again
    assert pool.renew("w", [(leased[4].rollout_id, 1)], now=1.0) == []  # its worker stops it
    assert pool.complete(leased[4].rollout_id, 1, "succeeded", reward=1.0) == "stale"  # a late report
    records = pool.batch_results(batch)
    cut = [r for r in records if cut_reason(r)]
    assert len(cut) == 5 and {cut_reason(r) for r in cut} == {"stale"}
    assert all(r.status == "abandoned" and "a call older than v1" in r.failure["reason"] for r in cut)
    s = assert_adds_up(pool, batch)
    assert (s["succeeded"], s["abandoned"], s["groups_done"]) == (4, 5, 3)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.dropped([r for r in records if r.group_id != g1], "stale", version=1)
    entries = read_ledger(tmp_path / "ledger.jsonl")
    assert [(e["outcome"], e["reason"]) for e in entries] == [("dropped", "stale")] * 6
    # Cut rollouts are no failures of the batch: they did not run to an end of their own.
    assert summarize_batch(ran(records)).failure_rate == 0.0


# ---- data order and resume -------------------------------------------------------------------------------


def _drawn(pool: TaskPool, n: int) -> list[str]:
    return [g["task_id"] for g in pool.groups(pool.start_batch(n, group_size=1))]


def test_epochs_cycle_and_shuffle_is_seeded():
    pool = TaskPool(tasks(5), shuffle=True, seed=3)
    seq = _drawn(pool, 12)
    assert sorted(seq[:5]) == sorted(seq[5:10]) == [f"t{i}" for i in range(5)]
    assert seq[:5] != seq[5:10] or seq[:5] != [f"t{i}" for i in range(5)]  # reshuffled per epoch
    assert _drawn(TaskPool(tasks(5), shuffle=True, seed=3), 12) == seq
    assert _drawn(TaskPool(tasks(5), shuffle=True, seed=4), 12) != seq
    assert _drawn(TaskPool(tasks(5), shuffle=False), 7) == ["t0", "t1", "t2", "t3", "t4", "t0", "t1"]
    assert pool.state()["epoch"] == 2 and pool.state()["cursor"] == 2


def test_state_resumes_exactly():
    original = TaskPool(tasks(7), seed=11)
    _drawn(original, 4)
    _drawn(original, 5)
    saved = json.loads(json.dumps(original.state()))
    expected = _drawn(original, 6) + _drawn(original, 9)
    resumed = TaskPool(tasks(7), seed=11)
    resumed.load_state(saved)
    assert _drawn(resumed, 6) + _drawn(resumed, 9) == expected
    for other, match in [
        (TaskPool(tasks(7), seed=12), "seed: saved 11, now 12"),
        (TaskPool(tasks(8), seed=11), "num_tasks"),
        (TaskPool(list(reversed(tasks(7))), seed=11), "order changed"),
    ]:
        with pytest.raises(ValueError, match=match):
            other.load_state(saved)


# ---- everything at once ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_random_operations_never_lose_a_rollout(seed):
    """Random leases, reports (duplicated, stale, retried), expiries and worker deaths: counts add up at
    every step, and driving the batch to the end gives every rollout exactly one final state."""
    rng = random.Random(seed)
    pool = TaskPool(tasks(6), group_size=3, max_attempts=3, lease_timeout_s=10)
    batch = pool.start_batch(5)
    now, held, next_worker = 0.0, [], 0
    workers = ["w0"]
    finals: dict[str, str] = {}
    for _ in range(400):
        now += rng.uniform(0, 3)
        op = rng.random()
        if op < 0.35:
            held += pool.lease(rng.choice(workers), rng.randint(1, 4), now=now)
        elif op < 0.75 and held:
            x = held.pop(rng.randrange(len(held)))
            status = rng.choice(["succeeded", "failed", "timed_out"])
            kw = {"kind": "agent_exception"} if status == "failed" else {}
            out = pool.complete(x.rollout_id, x.attempt, status, reward=1.0, retry=rng.random() < 0.3, **kw)
            if out == "accepted":
                assert x.rollout_id not in finals
                finals[x.rollout_id] = status
            if rng.random() < 0.3:  # a repeated report (even a contradicting one) never changes anything
                again = pool.complete(x.rollout_id, x.attempt, rng.choice(["succeeded", "timed_out"]))
                assert again == ("duplicate" if out in ("accepted", "requeued") else out)
        elif op < 0.85:
            pool.expire_leases(now=now)
        elif op < 0.92 and len(workers) > 1:
            pool.report_worker_dead(workers.pop(rng.randrange(len(workers))))
        else:
            next_worker += 1
            workers.append(f"w{next_worker}")
        assert_adds_up(pool, batch)
        assert_adds_up(pool)
    # Drain: a fresh worker finishes what is left, expiring anything still held by others.
    for _ in range(50):
        if pool.batch_done(batch):
            break
        now += 11
        pool.expire_leases(now=now)
        for x in pool.lease("finisher", 100, now=now):
            assert pool.complete(x.rollout_id, x.attempt, "succeeded", reward=0.0) == "accepted"
    assert pool.batch_done(batch)
    results = pool.batch_results(batch)
    assert len(results) == 15 and all(r.status in FINAL_STATUSES for r in results)
    for rid, status in finals.items():
        assert next(r.status for r in results if r.rollout_id == rid) == status
    s = assert_adds_up(pool, batch)
    assert (s["final"], s["groups_done"], s["done"]) == (15, 5, True)
