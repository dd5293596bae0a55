"""Rollout and step metrics through `ray.util.metrics`, so they show in the Ray dashboard (Prometheus) and in
the Grafana board `cluster/grafana-lightning-ray.json`.

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
            step=Gauge("lightning_ray_step", description="The last GRPO step done.", tag_keys=("run",)),
            step_seconds=Gauge(
                "lightning_ray_step_seconds",
                description="Seconds the last step spent in each part (rollout, learner, sync, step: the whole).",
                tag_keys=("run", "part"),
            ),
            tokens_per_s=Gauge(
                "lightning_ray_rollout_tokens_per_second",
                description="Generated tokens of the last step's rollouts per second of its rollout phase.",
                tag_keys=("run",),
            ),
            staleness=Gauge(
                "lightning_ray_staleness",
                description="Policy versions the last step's trained tokens lagged (mean and max).",
                tag_keys=("run", "stat"),
            ),
            policy_version=Gauge(
                "lightning_ray_policy_version",
                description="The policy version every inference replica serves after the last step's sync.",
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


STEP_PARTS = {
    "rollout": "time/rollout_s",
    "learner": "time/learner_s",
    "sync": "time/broadcast_s",
    "step": "time/step_s",
}


def record_step_metrics(step: int, metrics: dict[str, Any], run: str = "run") -> None:
    """Export one step's row of metrics.jsonl (`lightning_ray.loop.run_steps`): its time per part, generated
    tokens per second, staleness and the policy version the replicas now serve. Keys a row lacks are skipped."""
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
