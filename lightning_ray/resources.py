"""Whether a config fits the cluster it is about to run on, checked before anything is deployed: the totals
(`check_resources`) and each role's `placement` on the nodes that may host it (`check_placement`)."""

from __future__ import annotations

import math
from typing import Any

from lightning_ray.config import Config, ConfigError
from lightning_ray.config.threads import cpu_compute_units, starting_engines


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
    # The replicas Serve starts with (autoscaling adds more only where there is room); the frozen snapshot is a
    # second deployment.
    replicas = starting_engines(cfg)
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


def oversubscription(cfg: Config, cores: int) -> str | None:
    """A warning when the CPU compute threads that run at the same time outnumber the cores of a local
    cluster: every CPU engine's `inference.engine_threads` while agents run, and with `trainer.max_staleness`
    >= 1 the learner's `torch_threads` on top (it trains while they generate). OpenMP threads that outnumber
    the cores wait on each other at every barrier, so both sides slow down. None when they fit."""
    inf, lrn, k = cfg.inference, cfg.learner, cfg.trainer.max_staleness
    engines, ranks = cpu_compute_units(cfg)
    learner = ranks * lrn.torch_threads if k >= 1 else 0
    threads = engines * inf.engine_threads + learner
    if threads <= cores:
        return None
    parts = [f"{engines} CPU engine(s) x inference.engine_threads {inf.engine_threads}"]
    if learner:
        parts.append(
            f"{lrn.num_workers} learner rank(s) x learner.torch_threads {lrn.torch_threads}, training while "
            f"they generate (trainer.max_staleness {k})"
        )
    return (
        f"{threads} compute threads at once on {cores} cores ({' + '.join(parts)}): threads that outnumber the "
        "cores slow each other down; lower inference.engine_threads, or set it and learner.torch_threads to auto"
    )


class PlacementError(ConfigError):
    """A role whose `placement` no node of the cluster satisfies (or not for all of its actors)."""


def role_demands(cfg: Config) -> list[tuple[str, int, dict[str, float], dict[str, str]]]:
    """Per role: its config section, how many actors, what each asks for, the node labels they need."""
    inf, lrn, ro = cfg.inference, cfg.learner, cfg.rollout
    replicas = starting_engines(cfg)
    return [
        (
            "inference",
            replicas,
            {"CPU": inf.num_cpus_per_replica, "GPU": inf.num_gpus_per_replica, **inf.placement.resources},
            inf.placement.labels,
        ),
        (
            "learner",
            lrn.num_workers,
            {"CPU": lrn.num_cpus_per_worker, "GPU": lrn.num_gpus_per_worker, **lrn.placement.resources},
            lrn.placement.labels,
        ),
        (
            "rollout",
            ro.num_workers,
            {"CPU": ro.num_cpus_per_worker, **ro.placement.resources},
            ro.placement.labels,
        ),
    ]


def check_placement(cfg: Config, nodes: list[dict[str, Any]]) -> None:
    """Fail before anything starts when a role's actors cannot all be placed on the nodes its `placement`
    allows. `nodes` is `ray.nodes()` (alive ones count: `Resources`, `Labels`). Each role is checked alone; how
    the roles share the nodes is `check_resources`' and Ray's job."""
    alive = [n for n in nodes if n.get("Alive", True)]
    problems = []
    for role, count, need, labels in role_demands(cfg):
        fits = {_node_name(n): _actors_fitting(n, need) for n in alive if _has_labels(n, labels)}
        if sum(fits.values()) >= count:
            continue
        wanted = ", ".join(
            [f"{k}={v:g}" for k, v in need.items() if v > 0] + [f"label {k}={v}" for k, v in labels.items()]
        )
        found = "; ".join(_describe(n) for n in alive) or "none"
        problems.append(
            f"{role}.placement: {count} actor(s) each needing {wanted}, but the nodes that match hold "
            f"{sum(fits.values())} (nodes: {found})"
        )
    if problems:
        raise PlacementError(
            f"config {cfg.source or '(inline)'} cannot be placed on this cluster:\n  " + "\n  ".join(problems)
        )


def _has_labels(node: dict[str, Any], labels: dict[str, str]) -> bool:
    have = node.get("Labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


def _actors_fitting(node: dict[str, Any], need: dict[str, float]) -> int:
    have = node.get("Resources") or {}
    counts = [math.floor(have.get(name, 0.0) / amount + 1e-9) for name, amount in need.items() if amount > 0]
    return min(counts) if counts else 1_000_000  # asks for nothing: any matching node takes any number


def _node_name(node: dict[str, Any]) -> str:
    return str(node.get("NodeID") or node.get("NodeManagerAddress") or id(node))


def _describe(node: dict[str, Any]) -> str:
    res = node.get("Resources") or {}
    shown = {
        k: v
        for k, v in res.items()
        if not k.startswith("node:") and k not in ("memory", "object_store_memory")
    }
    labels = {k: v for k, v in (node.get("Labels") or {}).items() if not k.startswith("ray.io/")}
    return (
        f"{node.get('NodeManagerAddress', '?')} ({_node_name(node)[:8]}): resources {shown}, labels {labels}"
    )
