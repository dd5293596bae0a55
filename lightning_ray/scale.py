"""`lightning-ray scale RUN_DIR --workers N|auto`: set a running elastic run's rollout worker count by hand.

A train run writes RUN_DIR/ray.json when it starts (`write_run_address`): the Ray cluster it runs on, its
namespace and the name of its train task pool (`lightning_ray.names`). `scale_workers` joins that cluster
(from any machine that can reach it; under `ray job submit`, the head node) and tells the run's train pool the
count, which the driver applies within seconds while it waits for rollouts (`RolloutWorkers.scale`), or after
the learner step it is in. `auto` hands the count back to queue depth.
"""

from __future__ import annotations

import json
from pathlib import Path

import ray
import yaml

from lightning_ray.config import Config
from lightning_ray.names import task_pool

ADDRESS_FILE = "ray.json"
TIMEOUT_S = 30.0


class ScaleError(RuntimeError):
    """The run cannot be scaled as asked: not elastic, out of its bounds, or not running."""


def write_run_address(run_dir: Path, cfg: Config) -> None:
    """RUN_DIR/ray.json: where `lightning-ray scale` finds this run (written again by each resume)."""
    context = ray.get_runtime_context()  # the namespace the run's actors live in: the driver's own
    info = {
        "address": context.gcs_address,
        "namespace": context.namespace,
        "train_pool": task_pool(cfg, "train"),
    }
    (run_dir / ADDRESS_FILE).write_text(json.dumps(info, indent=2) + "\n")


def scale_workers(run_dir: str | Path, workers: int | None) -> str:
    """Ask the run in `run_dir` for `workers` rollout workers (None: back to queue depth); returns what was
    asked, as a line to print. Raises `ScaleError` when the run's config does not allow it."""
    run_dir = Path(run_dir)
    where, config = run_dir / ADDRESS_FILE, run_dir / "config.yaml"
    if not config.is_file():
        raise ScaleError(f"{config} not found: {run_dir} is not a run directory")
    rollout = Config.model_validate(yaml.safe_load(config.read_text())).rollout
    lo, hi = rollout.worker_bounds
    if lo == hi:
        raise ScaleError(
            f"{config}: rollout.min_workers = rollout.max_workers = {lo}, the run is not elastic; set "
            "rollout.max_workers above rollout.min_workers to scale it"
        )
    if workers is not None and not lo <= workers <= hi:
        raise ScaleError(
            f"--workers {workers} lies outside the run's rollout.min_workers={lo} .. rollout.max_workers={hi} "
            f"({config})"
        )
    if not where.is_file():
        raise ScaleError(f"{where} not found: {run_dir} is not the directory of a train run that is running")
    info = json.loads(where.read_text())
    if not ray.is_initialized():
        ray.init(address=info["address"], namespace=info["namespace"], log_to_driver=False)
    name = info["train_pool"]
    try:
        pool = ray.get_actor(name, namespace=info["namespace"])
    except ValueError as e:
        raise ScaleError(f"no running run at {run_dir}: its task pool {name!r} is not alive ({e})") from e
    ray.get(pool.request_workers.remote(workers), timeout=TIMEOUT_S)
    asked = "queue depth decides" if workers is None else f"{workers} workers"
    return f"{run_dir}: rollout workers {lo}..{hi}, {asked}"
