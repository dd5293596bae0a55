"""Two training runs side by side on one Ray cluster (threads of one driver, the session's cluster): each
deploys its own Serve app, weight registry, task pools and rollout workers (`lightning_ray.names`), both
complete with every rollout accounted for, and each stops only what it started."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from ray import serve

from lightning_ray.inference.server import APP_NAME
from lightning_ray.loop import train
from tests.integration.test_train_loop import loop_config


def all_actor_names() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}


@pytest.mark.slow  # two whole runs (two vLLM engines, two learners): ~2-3 minutes on 2 cores
def test_two_runs_side_by_side(inference, tiny_config, tmp_path):
    configs = []
    for _ in range(2):  # the same trainer.name and run_dir: only the run ids tell them apart
        cfg = loop_config(tiny_config, tmp_path, steps=2)
        cfg.trainer.val_every, cfg.trainer.checkpoint_every = 0, 0
        cfg.algorithm.drop_zero_variance = False
        configs.append(cfg)
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            results[i] = train(configs[i])
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), name=f"run-{i}") for i in range(2)]
    for t in threads:
        t.start()
    seen_apps: set[str] = set()
    seen_actors: set[str] = set()
    while any(t.is_alive() for t in threads):  # what the two runs hold while both are running
        seen_apps |= set(serve.status().applications)
        seen_actors |= all_actor_names()
        time.sleep(2)
    for t in threads:
        t.join()

    for i in range(2):
        assert isinstance(results[i], list), f"run {i} failed: {results[i]!r}"
        assert [r["step"] for r in results[i]] == [1, 2]
    ids = [c.ray.run_id for c in configs]
    assert ids[0] and ids[1] and ids[0] != ids[1]
    for run_id in ids:  # each run had its own app, registry, pool and workers, all alive at some point
        assert f"{APP_NAME}.{run_id}" in seen_apps
        assert f"weights-{APP_NAME}.{run_id}" in seen_actors
        assert f"lightning_ray.task_pool.train.{run_id}" in seen_actors
        assert f"rollout-worker.{run_id}-0" in seen_actors
    run_dirs = sorted(Path(tmp_path / "runs" / "loop").iterdir())
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed", summary
        assert summary["rollouts"]["lost"] == 0, summary
    # each run removed what it started, and neither touched the session's shared app
    remaining = set(serve.status().applications)
    assert APP_NAME in remaining and not any(run_id in app for app in remaining for run_id in ids)
    assert not any(run_id in name for name in all_actor_names() for run_id in ids if "weights-" not in name)
