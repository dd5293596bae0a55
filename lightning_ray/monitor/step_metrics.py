"""A training step's metrics of its parts: how busy each was, what the rollouts did, where the weights went."""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc

from lightning_ray.monitor.busy import BusyClock
from lightning_ray.rollouts.collect import Batch


def busy_metrics(clock: BusyClock, m: dict[str, Any]) -> dict[str, float]:
    """Busy fractions of each part over the step; what is not busy waited on another part."""
    wall = max(m["time/step_s"], 1e-9)
    return {
        **clock.fractions(),
        "time/learner_busy_frac": m["time/learner_s"] / wall,
        "time/sync_busy_frac": m["time/broadcast_s"] / wall,
    }


def rollout_metrics(batch: Batch) -> dict[str, Any]:
    """What the step's rollouts did: all of them, as `rollout/rollouts` counts them, the groups dropped before
    training (zero variance, stale) included, but not the rollouts of groups cut before they ended (the ledger
    has them: `ledger/dropped/stale`); `rollout/llm_calls_trained` is the part that trains."""
    s = batch.summary
    calls = batch.calls_used()
    out = {
        "rollout/success_rate": s.success_rate,
        "rollout/reward_mean": s.reward_mean,
        "rollout/reward_std": s.reward_std,
        "rollout/rollouts": s.num_rollouts,
        "rollout/llm_calls": calls.num_rows,
        "rollout/llm_calls_trained": batch.transitions.num_rows,
        "rollout/tokens": pc.sum(pc.list_value_length(calls["response_ids"])).as_py() or 0,
        "rollout/groups_cut": batch.cut,
    }
    out.update({f"rollout/failures/{k}": n for k, n in s.failures_by_kind.items()})
    if batch.transitions.num_rows:
        out["rollout/policy_version"] = pc.min(batch.transitions["policy_version"]).as_py()
    return out


def sync_metrics(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The policy version every replica now serves (the lowest, should one lag) and how the weights went."""
    return {
        "sync/version": min(r["policy_version"] for r in results),
        "sync/replicas": len(results),
        "sync/replica_max_s": max(r["total_s"] for r in results),
        "sync/fallbacks": sum(r["path"] == "object_store_fallback" for r in results),
    }
