"""`auto` compute threads: how many OpenMP threads each CPU engine and learner rank runs, settled when the config
is validated so that the run's recorded config.yaml holds the numbers it ran with.

On a joined cluster (`ray.address` or RAY_ADDRESS) an actor computes with the CPUs Ray gives it:
`num_cpus_per_replica` / `num_cpus_per_worker`, at least 1. A local cluster's logical CPUs (`ray.num_cpus`) need
not be cores, so there `auto` divides this machine's cores among what computes at the same time. In a synchronous
loop (`trainer.max_staleness: 0`) the engines generate while the learner waits, then the learner trains while
they idle: the engines share the cores, and so do the learner's ranks. With `max_staleness >= 1` they all compute
at once and share the cores between them: threads that outnumber the cores wait on each other at every OpenMP
barrier. On 2 cores, an engine thread beside a two-thread learner left K = 1 at 0.94x the synchronous samples/s
(2026-12-01); one thread each, as `auto` gives, 1.17-1.96x in three runs, 1.31-1.61x per learner token
(benchmarks/results/async_pipeline*.json, 2026-12-02). A two-thread learner in the background instead
(SCHED_IDLE, computing on what the engine leaves idle) was no faster in the loop: 1.53-1.82x, the learner at
0.67-0.68x the synchronous one's tokens per second as with one thread (benchmarks/README.md, 2026-12-03).
"""

from __future__ import annotations

import os
from typing import Any


def local_cores() -> int:
    """The cores this process may run on (its affinity, which a container's cpuset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cluster_address(cfg: Any) -> str | None:
    """The running cluster a run of `cfg` joins (`ray.address`, else RAY_ADDRESS, which `ray job submit` sets);
    None: it starts a local one."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS")


def starting_engines(cfg: Any) -> int:
    """The vLLM replicas a run starts with: the frozen agents' snapshot is a second deployment."""
    return cfg.inference.starting_replicas() * (2 if cfg.rollout.frozen_agents else 1)


def cpu_compute_units(cfg: Any) -> tuple[int, int]:
    """The CPU engines and CPU learner ranks of `cfg`."""
    inf, lrn = cfg.inference, cfg.learner
    return (
        starting_engines(cfg) if inf.num_gpus_per_replica == 0 else 0,
        lrn.num_workers if lrn.num_gpus_per_worker == 0 else 0,
    )


def settle_threads(cfg: Any) -> None:
    """Replace `inference.engine_threads: auto` and `learner.torch_threads: auto` by numbers (module docstring)."""
    inf, lrn = cfg.inference, cfg.learner
    if "auto" not in (inf.engine_threads, lrn.torch_threads):
        return
    if cluster_address(cfg):
        engine, learner = int(inf.num_cpus_per_replica), int(lrn.num_cpus_per_worker)
    else:
        cores, (engines, ranks) = local_cores(), cpu_compute_units(cfg)
        if cfg.trainer.max_staleness >= 1:
            engine = learner = cores // max(engines + ranks, 1)
        else:
            engine, learner = cores // max(engines, 1), cores // max(ranks, 1)
    if inf.engine_threads == "auto":
        inf.engine_threads = max(engine, 1)
    if lrn.torch_threads == "auto":
        lrn.torch_threads = max(learner, 1)
