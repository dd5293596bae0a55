"""Whether a config fits the cluster it is about to run on, checked before anything is deployed."""

from __future__ import annotations

from lightning_ray.config import Config, ConfigError


def check_resources(cfg: Config, resources: dict[str, float]) -> None:
    """Fail before anything is deployed if the cluster cannot hold what the config asks for.

    `resources` is `ray.cluster_resources()` (or the local machine's), so an impossible request is an error
    with the field name, not a placement that waits forever.
    """
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    problems = []
    inf, lrn, ro = cfg.inference, cfg.learner, cfg.rollout
    if inf.num_gpus_per_replica > gpus:
        problems.append(
            f"inference.num_gpus_per_replica: {inf.num_gpus_per_replica} > {gpus:g} GPUs in the cluster"
        )
    if lrn.num_gpus_per_worker > gpus:
        problems.append(
            f"learner.num_gpus_per_worker: {lrn.num_gpus_per_worker} > {gpus:g} GPUs in the cluster"
        )
    replicas = inf.num_replicas * (2 if ro.frozen_agents else 1)  # the frozen snapshot is a second deployment
    need_gpus = replicas * inf.num_gpus_per_replica + lrn.num_workers * lrn.num_gpus_per_worker
    if need_gpus > gpus + 1e-9:
        problems.append(f"inference+learner ask for {need_gpus:g} GPUs, the cluster has {gpus:g}")
    need_cpus = (
        replicas * inf.num_cpus_per_replica
        + lrn.num_workers * lrn.num_cpus_per_worker
        + ro.num_workers * ro.num_cpus_per_worker
    )
    if need_cpus > cpus + 1e-9:
        problems.append(
            f"inference+learner+rollout ask for {need_cpus:g} CPUs, the cluster has {cpus:g} "
            "(lower num_cpus_per_* or set ray.num_cpus for a local cluster)"
        )
    if problems:
        raise ConfigError(
            f"config {cfg.source or '(inline)'} does not fit the cluster:\n  " + "\n  ".join(problems)
        )
