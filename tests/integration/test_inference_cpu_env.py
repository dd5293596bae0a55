"""The CPU replica's vLLM processes really run with tcmalloc and Intel OpenMP loaded (vLLM's CPU guide)."""

from __future__ import annotations

from lightning_ray.inference.cpu_env import PRELOADS, preload_libs


def test_vllm_processes_of_the_replica_have_the_preloads_mapped(inference, tiny_config):
    assert tiny_config.inference.cpu_preload == list(PRELOADS)
    found, missing = preload_libs(PRELOADS)
    assert missing == [], "run ./install.sh"
    processes = inference.engine_processes.remote().result()
    vllm = [p for p in processes if p["name"].startswith("VLLM::")]
    # `inference.cpu_executor: uni` (the default): the model runs in the engine core, no worker process
    assert {p["name"] for p in vllm} == {"VLLM::EngineCor"}, processes  # comm is 15 chars
    for p in vllm:
        assert found["tcmalloc"].resolve().name in p["libs"], p
        assert found["iomp"].name in p["libs"], p
    # the replica itself was already running: nothing is forced into it
    replica = processes[0]
    assert not any(lib.startswith(("libtcmalloc", "libiomp")) for lib in replica["libs"]), replica
