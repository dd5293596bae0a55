"""A full disk while the driver writes the run's own files (ledger.jsonl, a step's trajectories, summary.json) is a
named error naming the file, and the file keeps what it held before (on a real, small tmpfs, as the checkpoint
and metrics tests fill one)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_ray.data.schema import write_parquet
from lightning_ray.loop import write_summary
from lightning_ray.rollouts.ledger import Ledger, read_ledger
from lightning_ray.run_files import RunFileWriteError
from lightning_ray.tasks.records import RolloutRecord
from tests.unit.test_checkpoints import fill, small_tmpfs


def record(i: int, status: str = "succeeded") -> RolloutRecord:
    return RolloutRecord(
        rollout_id=f"r{i}-{'x' * 60}",
        batch_id="b",
        group_id=f"g{i // 4}",
        index_in_group=i % 4,
        task_id=f"t{i // 4}",
        status=status,
        attempts=1,
        worker_id="w0",
        kind=None if status == "succeeded" else "agent_exception",
        reward=1.0,
        failure=None,
        result=None,
        history=(),
    )


def test_a_full_disk_stops_the_ledger_without_a_half_entry(tmp_path):
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        ledger = Ledger(disk / "ledger.jsonl")
        ledger.trained([record(i) for i in range(4)], version=0)
        before = ledger.path.read_bytes()
        fill(disk)
        with pytest.raises(RunFileWriteError) as e:
            ledger.dropped([record(i, "failed") for i in range(4, 404)], "all_failed", version=1)  # ~60 KB
        assert str(e.value).startswith(f"could not write {ledger.path}: appending 400 rollouts (")
        assert "No space left on device" in str(e.value)
        assert ledger.path.read_bytes() == before  # cut back: a resume reads whole entries only
        assert [x["version"] for x in read_ledger(ledger.path)] == [0] * 4
        assert sum(ledger.totals.values()) == 4 and len(ledger.entered) == 4  # the unwritten are not entered


def test_a_full_disk_keeps_the_earlier_trajectories_file(tmp_path):
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        first = pa.table({"rollout_id": ["a", "b"], "reward": [0.5, 1.0]})
        path = write_parquet(first, disk, "step-000001-rollouts")
        fill(disk)
        bigger = pa.table({"rollout_id": [f"r{i}" for i in range(20_000)], "reward": [0.0] * 20_000})
        with pytest.raises(RunFileWriteError) as e:
            write_parquet(bigger, disk, "step-000001-rollouts")  # a step written again after a resume
        assert str(e.value).startswith(f"could not write {path}: writing 20000 rows: ")
        assert pq.read_table(path).equals(first)
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no partial file left


def test_a_full_disk_keeps_the_earlier_summary_and_says_how_the_run_ended(tmp_path):
    workers = SimpleNamespace(restarts=0, deaths=[], added=0, retired=0)  # RolloutWorkers' counters only
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        write_summary(disk, {"status": "completed", "cause": None, "steps_done": 2}, None, None, workers)
        before = (disk / "summary.json").read_text()
        fill(disk)
        workers.deaths = [f"worker {i}: ActorDiedError: the actor died unexpectedly" for i in range(200)]
        end = {
            "status": "stopped",
            "cause": "FailureRateExceeded: rollout failure rate 100.0%",
            "steps_done": 3,
        }
        with pytest.raises(RunFileWriteError) as e:
            write_summary(disk, end, None, None, workers)
        message = str(e.value)
        assert message.startswith(
            f"could not write {disk / 'summary.json'}: writing the summary of a run that"
        )
        assert "stopped (FailureRateExceeded: rollout failure rate 100.0%)" in message
        assert "No space left on device" in message
        assert (disk / "summary.json").read_text() == before
        assert json.loads(before)["status"] == "completed"
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "summary.json"]
