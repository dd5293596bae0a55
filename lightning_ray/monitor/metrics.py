"""Rollout and step metrics through `ray.util.metrics`, so they show in the Ray dashboard (Prometheus) and in
the Grafana board `cluster/grafana-lightning-ray.json`.

Ray exports them with a `ray_` prefix, e.g. `ray_lightning_ray_batch_success_rate{run="..."}`.
Metric objects are created once per process and reused.
"""

from __future__ import annotations

from typing import Any

from lightning_ray.monitor.summary import BatchSummary

_metrics: dict[str, Any] = {}


# name -> (Ray metric name without its `lightning_ray_` prefix, description, tag keys besides `run`)
COUNTERS = {
    "rollouts": ("rollouts", "Finished rollouts by final status.", ("status",)),
    "failures": ("rollout_failures", "Failed rollouts by kind.", ("kind",)),
    "batches": ("batches", "Rollout batches summarised.", ()),
}
GAUGES = {
    "success_rate": ("batch_success_rate", "Success rate of the last batch.", ()),
    "failure_rate": ("batch_failure_rate", "Failure rate of the last batch.", ()),
    "reward_mean": ("batch_reward_mean", "Mean reward of the last batch.", ()),
    "reward_std": ("batch_reward_std", "Reward std of the last batch.", ()),
    "step": ("step", "The last GRPO step done.", ()),
    "step_seconds": (
        "step_seconds",
        "Seconds the last step spent in each part (rollout, learner, sync; step: the whole).",
        ("part",),
    ),
    "tokens_per_s": (
        "rollout_tokens_per_second",
        "Generated tokens of the last step's rollouts per second of its rollout phase.",
        (),
    ),
    "staleness": (
        "staleness",
        "Policy versions the last step's trained tokens lagged (mean, max).",
        ("stat",),
    ),
    "policy_version": (
        "policy_version",
        "The policy version every inference replica serves after the last step's sync.",
        (),
    ),
    "workers": (
        "workers",
        "Rollout workers and inference replicas after the last step: serving, retiring, and the count scaling "
        "aims at.",
        ("role", "state"),
    ),
}


def _get_metrics() -> dict[str, Any]:
    if not _metrics:
        from ray.util.metrics import Counter, Gauge

        for kind, specs in ((Counter, COUNTERS), (Gauge, GAUGES)):
            for key, (name, description, tags) in specs.items():
                _metrics[key] = kind(
                    f"lightning_ray_{name}", description=description, tag_keys=("run", *tags)
                )
    return _metrics


def record_batch_metrics(summary: BatchSummary, run: str = "run") -> None:
    """Export one batch summary: counters add its rollouts by status and failures by kind; gauges hold the
    last batch's rates and reward statistics (reward gauges keep their value when a batch has no reward)."""
    m = _get_metrics()
    tags = {"run": run}
    m["batches"].inc(1, tags=tags)
    for status, n in summary.by_status.items():
        if n > 0:
            m["rollouts"].inc(n, tags={"run": run, "status": status})
    for kind, n in summary.failures_by_kind.items():
        if n > 0:
            m["failures"].inc(n, tags={"run": run, "kind": kind})
    m["success_rate"].set(summary.success_rate, tags=tags)
    m["failure_rate"].set(summary.failure_rate, tags=tags)
    if summary.reward_mean is not None:
        m["reward_mean"].set(summary.reward_mean, tags=tags)
    if summary.reward_std is not None:
        m["reward_std"].set(summary.reward_std, tags=tags)


STEP_PARTS = {
    "rollout": "time/rollout_s",
    "learner": "time/learner_s",
    "sync": "time/broadcast_s",
    "step": "time/step_s",
}


WORKER_COUNTS = {
    ("rollout", "serving"): "rollout/workers",
    ("rollout", "target"): "rollout/workers_target",
    ("rollout", "retiring"): "rollout/workers_retiring",
    ("inference", "serving"): "inference/replicas",
    ("inference", "target"): "inference/replicas_target",
}


def record_step_metrics(step: int, metrics: dict[str, Any], run: str = "run") -> None:
    """Export one step's row of metrics.jsonl (`lightning_ray.loop.run_steps`): its time per part, generated
        tokens per second, staleness, the policy version the replicas now serve, and how many rollout workers and
    replicas there are. Keys a row lacks are skipped."""
    m = _get_metrics()
    tags = {"run": run}
    m["step"].set(step, tags=tags)
    for part, key in STEP_PARTS.items():
        if metrics.get(key) is not None:
            m["step_seconds"].set(metrics[key], tags={**tags, "part": part})
    if metrics.get("rollout/tokens") is not None and metrics.get("time/rollout_s"):
        m["tokens_per_s"].set(metrics["rollout/tokens"] / metrics["time/rollout_s"], tags=tags)
    for stat in ("mean", "max"):
        if metrics.get(f"staleness/{stat}") is not None:
            m["staleness"].set(metrics[f"staleness/{stat}"], tags={**tags, "stat": stat})
    if metrics.get("sync/version") is not None:
        m["policy_version"].set(metrics["sync/version"], tags=tags)
    for (role, state), key in WORKER_COUNTS.items():
        if metrics.get(key) is not None:
            m["workers"].set(metrics[key], tags={**tags, "role": role, "state": state})
