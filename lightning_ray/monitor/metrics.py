"""Per-batch rollout metrics through `ray.util.metrics`, so they show in the Ray dashboard (Prometheus).

Ray exports them with a `ray_` prefix, e.g. `ray_lightning_ray_batch_success_rate{run="..."}`.
Metric objects are created once per process and reused.
"""

from __future__ import annotations

from typing import Any

from lightning_ray.monitor.summary import BatchSummary

_metrics: dict[str, Any] = {}


def _get_metrics() -> dict[str, Any]:
    if not _metrics:
        from ray.util.metrics import Counter, Gauge

        _metrics.update(
            rollouts=Counter(
                "lightning_ray_rollouts",
                description="Finished rollouts by final status.",
                tag_keys=("run", "status"),
            ),
            failures=Counter(
                "lightning_ray_rollout_failures",
                description="Failed rollouts by kind.",
                tag_keys=("run", "kind"),
            ),
            batches=Counter(
                "lightning_ray_batches", description="Rollout batches summarised.", tag_keys=("run",)
            ),
            success_rate=Gauge(
                "lightning_ray_batch_success_rate",
                description="Success rate of the last batch.",
                tag_keys=("run",),
            ),
            failure_rate=Gauge(
                "lightning_ray_batch_failure_rate",
                description="Failure rate of the last batch.",
                tag_keys=("run",),
            ),
            reward_mean=Gauge(
                "lightning_ray_batch_reward_mean",
                description="Mean reward of the last batch.",
                tag_keys=("run",),
            ),
            reward_std=Gauge(
                "lightning_ray_batch_reward_std",
                description="Reward std of the last batch.",
                tag_keys=("run",),
            ),
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
