"""The wandb table of sampled trajectories logged at each validation step (`RunLog.log`).

It reads the step's rollouts back from the run directory through the run page's reader, so wandb shows the same
rollouts, with the same fields, as the trajectory browser (`lightning-ray view`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = [
    "step",
    "task_id",
    "rollout_id",
    "group_id",
    "reward",
    "status",
    "failure_kind",
    "calls",
    "responses",
]


def sampled_rollouts(run_dir: Path, step: int, n: int = 8) -> list[list[Any]]:
    """Rows (`COLUMNS`) for `n` rollouts of `step`, evenly spaced over its groups; [] before any step."""
    from lightning_ray.view.run_data import Filters, RunData  # the reader reads metrics with run_log's reader

    data = RunData(run_dir)
    rows = data.page(Filters(step=step), size=100_000).rows
    picked = rows[:: max(1, len(rows) // n)][:n]
    out = []
    for r in picked:
        calls = data.calls(step, r["rollout_id"], r["attempt"])
        responses = "\n\n".join(f"[{c['call_index']} {c['agent']}] {c['response_text']}" for c in calls)
        out.append([step, *(r[k] for k in COLUMNS[1:7]), len(calls), responses])
    return out


def trajectory_table(run_dir: Path, step: int) -> Any | None:
    """A `wandb.Table` of `sampled_rollouts`, or None when the step recorded none."""
    rows = sampled_rollouts(run_dir, step)
    if not rows:
        return None
    import wandb

    return wandb.Table(columns=COLUMNS, data=rows)
