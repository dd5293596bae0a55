"""Joining or starting a Ray cluster, the same way for a laptop run and a `ray job submit`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray
import yaml

from lightning_ray.config import Config, public_dump
from lightning_ray.resources import check_resources

log = logging.getLogger(__name__)


def local_resources(cfg: Config) -> dict[str, float]:
    """What a local cluster started from this config would hold (for `check` without a cluster)."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        pass
    return {"CPU": float(cfg.ray.num_cpus or os.cpu_count() or 1), "GPU": float(gpus)}


def init_ray(cfg: Config) -> dict[str, float]:
    """Join the cluster named by `ray.address` / RAY_ADDRESS (a submitted job has it set), else start a local
    one on loopback with the project on the workers' path. Then fail fast if the config cannot fit the cluster."""
    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, namespace=cfg.ray.namespace, log_to_driver=True)
        else:
            ray.init(
                num_cpus=cfg.ray.num_cpus,
                namespace=cfg.ray.namespace,
                include_dashboard=None,
                _node_ip_address="127.0.0.1",
                runtime_env={"env_vars": {"PYTHONPATH": _pythonpath()}},
            )
    resources = ray.cluster_resources()
    check_resources(cfg, resources)
    return resources


def _pythonpath() -> str:
    """Workers of a local cluster import the agent module (`examples.calc.agent`) from the driver's cwd."""
    parts = [os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


def new_run_dir(cfg: Config, kind: str) -> Path:
    """runs/<name>/<kind>-<timestamp>/ with the resolved config beside the outputs (secrets masked)."""
    import time

    path = Path(cfg.trainer.run_dir) / cfg.trainer.name / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(public_dump(cfg), sort_keys=False))
    return path
