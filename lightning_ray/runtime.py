"""Joining or starting a Ray cluster, the same way for a laptop run and a `ray job submit`."""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

import ray
import yaml

from lightning_ray.config import Config, public_dump
from lightning_ray.config.threads import cluster_address, local_cores
from lightning_ray.names import assign_run_id
from lightning_ray.resources import check_placement, check_resources, oversubscription

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
    one on loopback with the project on the workers' path. Then fail fast if the config cannot fit the cluster
    or a role cannot be placed on the nodes its `placement` allows."""
    if not ray.is_initialized():
        address = cluster_address(cfg)
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
            _warn_oversubscription(cfg)
    resources = ray.cluster_resources()
    check_resources(cfg, resources)
    check_placement(cfg, ray.nodes())
    return resources


def check_local(cfg: Config) -> None:
    """`check` without a cluster: whether the config fits the local cluster `init_ray` would start, one node
    with no custom resources or labels."""
    resources = local_resources(cfg)
    check_resources(cfg, resources)
    check_placement(cfg, [{"NodeID": "local", "NodeManagerAddress": "this machine", "Resources": resources}])
    _warn_oversubscription(cfg)


def _warn_oversubscription(cfg: Config) -> None:
    """A local cluster runs on this machine's cores (`resources.oversubscription`)."""
    if warning := oversubscription(cfg, local_cores()):
        log.warning("warning: %s", warning)


def _pythonpath() -> str:
    """Workers of a local cluster import the agent module (`examples.calc.agent`) from the driver's cwd."""
    parts = [os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


def run_directory(cfg: Config, kind: str, resume: str | None = None) -> Path:
    """The run's directory, `resume` or a new one (`new_run_dir`), and the run's id (`ray.run_id`, which scopes
    the names of its apps and actors: `lightning_ray.names`)."""
    if resume is None:
        return new_run_dir(cfg, kind)
    assign_run_id(cfg, Path(resume))
    return Path(resume)


def new_run_dir(cfg: Config, kind: str) -> Path:
    """runs/<name>/<kind>-<timestamp>[-N]/ (a new folder even when another run of the same name started in the
    same second) with the resolved config beside the outputs (secrets masked); sets `ray.run_id` if unset."""
    import time

    stamp = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = Path(cfg.trainer.run_dir) / cfg.trainer.name
    parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        path = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            break
        except FileExistsError:
            continue
    assign_run_id(cfg, path)
    (path / "config.yaml").write_text(yaml.safe_dump(public_dump(cfg), sort_keys=False))
    return path
