"""Elastic rollout workers without a cluster: the scaling decision, the config's bounds, the pool's side of a
worker that retires or a count set by hand, and `lightning-ray scale`'s refusals."""

from __future__ import annotations

import json

import pytest
import yaml

from lightning_ray.cli import main
from lightning_ray.config import ConfigError, load_config
from lightning_ray.rollouts.scaling import Autoscaler
from lightning_ray.tasks.dataset import Task
from lightning_ray.tasks.pool import TaskPool
from lightning_ray.tasks.records import RolloutReport


def scaler(**kw) -> Autoscaler:
    return Autoscaler(
        **{"min_workers": 1, "max_workers": 4, "concurrency": 8, "up_delay_s": 10, "down_delay_s": 60, **kw}
    )


def test_queue_depth_sets_the_count_within_the_bounds():
    s = scaler()
    assert [s.wanted(n) for n in (0, 1, 8, 9, 24, 25, 1000)] == [1, 1, 1, 2, 3, 4, 4]


def test_the_count_moves_only_after_the_wish_held_its_delay():
    s = scaler()
    assert s.decide(current=1, demand=30, now=0.0) == 1  # wants 4 from now on
    assert s.decide(current=1, demand=30, now=9.9) == 1
    assert s.decide(current=1, demand=30, now=10.0) == 4
    # down needs 60 s of less demand; a moment of more demand meanwhile starts the wait again
    assert s.decide(current=4, demand=0, now=20.0) == 4
    assert s.decide(current=4, demand=0, now=70.0) == 4
    assert s.decide(current=4, demand=32, now=75.0) == 4  # wants 4 = current: the wish to go down ends
    assert s.decide(current=4, demand=0, now=76.0) == 4
    assert s.decide(current=4, demand=0, now=136.0) == 1


def test_a_count_set_by_hand_wins_and_is_kept_within_the_bounds():
    s = scaler()
    assert s.decide(current=1, demand=0, now=0.0, requested=3) == 3
    assert s.decide(current=3, demand=1000, now=100.0, requested=2) == 2
    assert s.decide(current=2, demand=0, now=0.0, requested=9) == 4


def test_config_bounds_name_their_fields():
    with pytest.raises(
        ConfigError,
        match="rollout.num_workers=3 must lie within rollout.min_workers=1 and rollout.max_workers=2",
    ):
        load_config(
            None,
            ["rollout.num_workers=3", "rollout.min_workers=1", "rollout.max_workers=2"],
            check_files=False,
        )
    cfg = load_config(None, ["rollout.num_workers=2", "rollout.max_workers=5"], check_files=False)
    assert cfg.rollout.worker_bounds == (2, 5)


def test_a_retiring_worker_leases_nothing_and_still_reports_what_it_holds():
    pool = TaskPool([Task(f"t{i}", {"q": i}) for i in range(2)], group_size=2, shuffle=False)
    batch = pool.start_batch(2)
    [held] = pool.lease("w0", 1)
    pool.retire_worker("w0")
    assert pool.retiring("w0") and pool.lease("w0", 4) == []
    assert len(pool.lease("w1", 4)) == 3  # the others' queue is untouched
    assert pool.renew("w0", [(held.rollout_id, held.attempt)]) == [held.rollout_id]
    report = [(held.rollout_id, held.attempt, "succeeded", None, 1.0, None, False)]
    pool.complete_all([RolloutReport(*r) for r in report], result=None)
    pool.report_worker_dead("w0", "scaled down")  # it is stopped: nothing left to revoke
    stats = pool.stats()
    assert stats["succeeded"] == 1 and stats["leased"] == 3 and stats["requeued"] == 0
    assert (stats["workers_alive"], stats["workers_retired"], stats["workers_dead"]) == (1, 1, 0)
    assert not pool.batch_done(batch)


def test_the_pool_keeps_a_count_set_by_hand():
    pool = TaskPool([Task("t0", {})], group_size=1)
    assert pool.stats()["workers_requested"] is None
    pool.request_workers(3)
    assert pool.stats()["workers_requested"] == 3
    pool.request_workers(None)
    assert pool.stats()["workers_requested"] is None
    with pytest.raises(ValueError, match="at least one rollout worker"):
        pool.request_workers(0)


def _run_dir(tmp_path, **rollout) -> str:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"rollout": rollout}))
    (run / "ray.json").write_text(json.dumps({"address": "127.0.0.1:1", "namespace": "x", "train_pool": "p"}))
    return str(run)


@pytest.mark.parametrize(
    ("rollout", "workers", "says"),
    [
        ({"num_workers": 2}, "3", "rollout.min_workers = rollout.max_workers = 2, the run is not elastic"),
        (
            {"num_workers": 1, "max_workers": 3},
            "4",
            "--workers 4 lies outside the run's rollout.min_workers=1 .. rollout.max_workers=3",
        ),
    ],
)
def test_scale_refuses_what_the_run_does_not_allow_before_joining_its_cluster(
    tmp_path, capsys, rollout, workers, says
):
    assert main(["scale", _run_dir(tmp_path, **rollout), "--workers", workers]) == 2
    assert says in capsys.readouterr().err


def test_scale_names_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["scale", str(tmp_path), "--workers", "2"]) == 2
    assert (
        f"{tmp_path / 'config.yaml'} not found: {tmp_path} is not a run directory" in capsys.readouterr().err
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"rollout": {"num_workers": 1, "max_workers": 2}}))
    assert main(["scale", str(tmp_path), "--workers", "2"]) == 2
    assert f"{tmp_path / 'ray.json'} not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["scale", str(tmp_path), "--workers", "two"])
