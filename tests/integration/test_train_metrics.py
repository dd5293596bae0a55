"""The project's metrics on the Ray node's Prometheus endpoint, scraped while a short training run goes on (the
endpoint that the Ray dashboard and the Grafana board `cluster/grafana-lightning-ray.json` read)."""

from __future__ import annotations

import threading
import time
import urllib.request
import uuid

import pytest

from lightning_ray.loop import train
from tests.integration.test_train_loop import loop_config

WANTED = [
    "ray_lightning_ray_rollouts_total",
    "ray_lightning_ray_batch_reward_mean",
    "ray_lightning_ray_step",
    "ray_lightning_ray_step_seconds",
    "ray_lightning_ray_rollout_tokens_per_second",
    "ray_lightning_ray_staleness",
    "ray_lightning_ray_policy_version",
    "ray_lightning_ray_workers",
]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


@pytest.mark.slow
def test_step_metrics_reach_the_prometheus_endpoint_during_a_run(inference, tiny_config, tmp_path):
    import ray

    cfg = loop_config(tiny_config, tmp_path, steps=2)
    cfg.trainer.name = f"metrics-{uuid.uuid4().hex[:6]}"
    cfg.trainer.val_every = 0
    port = ray.nodes()[0]["MetricsExportPort"]
    seen: dict[str, str] = {}  # metric line (name and labels) -> value, the last scrape's
    running = threading.Event()
    running.set()

    def watch() -> None:
        while running.is_set():
            for line in scrape(port).splitlines():
                if f'run="{cfg.trainer.name}"' in line:
                    labels, value = line.rsplit(" ", 1)
                    seen[labels] = value
            time.sleep(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        train(cfg)
        deadline = time.monotonic() + 60  # Ray exports every few seconds
        while time.monotonic() < deadline and not all(
            any(k.startswith(w + "{") for k in seen) for w in WANTED
        ):
            time.sleep(1.0)
    finally:
        running.clear()
        watcher.join(timeout=30)
    names = {labels.split("{", 1)[0] for labels in seen}
    assert set(WANTED) <= names, f"missing {set(WANTED) - names}"
    parts = {labels for labels in seen if labels.startswith("ray_lightning_ray_step_seconds{")}
    assert {p.split('part="')[1].split('"')[0] for p in parts} == {"rollout", "learner", "sync", "step"}
    [version] = [v for k, v in seen.items() if k.startswith("ray_lightning_ray_policy_version{")]
    assert float(version) == 2.0  # the replicas serve the weights of step 2
