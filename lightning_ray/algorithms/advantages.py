"""Per-row advantages for a trajectory table (one row per LLM call), computed per GRPO group.

Statistics are taken over *rollouts*, not rows: a rollout that made five LLM calls counts once in its group's
mean and std, exactly like a rollout that made one. Each row is then credited:

- `rollout value` (what enters the group statistics) = the rollout's `reward`, or, when that is null, the sum
  of its calls' `call_reward`s. A rollout with neither has no reward and its rows are dropped;
- `credited reward` of a row = its `call_reward` when the agent emitted one for that call, else the rollout
  value (the same on every call of the rollout).

Estimators (`b` = baseline, `s` = scale, advantage = (credited - b) / s):

- grpo:          b = group mean, s = group sample std (ddof=1) when `norm_std`, else 1.
                 Rewards [1, 0, 0, 1]: mean 0.5, sample std sqrt(1/3) = 0.577 -> advantages +-0.866.
- dr_grpo:       b = group mean, s = 1 (Dr. GRPO removes the std division whatever `norm_std` says).
- rloo:          b = mean of the *other* rollouts of the group (leave-one-out), s = 1.
- reinforce_pp:  REINFORCE++ global batch normalisation: b = batch mean, s = batch sample std over all kept
                 rollouts (groups are only used for zero-variance dropping).

A group is "zero variance" when its rollout values all agree (sample std <= ZERO_STD, or a single rollout).
It carries no learning signal for the group-relative estimators; with `drop_zero_variance` its rows are
removed, otherwise they are kept and their scale is 1 (so a per-call reward is not divided by ~0).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lightning_ray.config import AlgorithmConfig

ZERO_STD = 1e-6
ADVANTAGE_COLUMN = "advantage"


def _codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, int]:
    """Dense integer codes (0..k-1, in order of first appearance) for a string column."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    encoded = arr.dictionary_encode()
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), len(encoded.dictionary)


def _float_column(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values with nulls as 0.0, valid mask) as float64 numpy arrays."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    arr = pc.cast(arr, pa.float64())
    valid = pc.is_valid(arr).to_numpy(zero_copy_only=False)
    values = pc.fill_null(arr, 0.0).to_numpy(zero_copy_only=False)
    return values, valid


def rollout_rewards(table: pa.Table) -> dict[str, np.ndarray]:
    """Per-rollout view of a table.

    Returns `row_rollout` (rollout code of each row), `rollout_group` (group code of each rollout),
    `value` (each rollout's reward for the group statistics), `has_value` (whether it has one) and
    `credited` (each row's credited reward).
    """
    row_rollout, n_rollouts = _codes(table.column("rollout_id"))
    row_group, _ = _codes(table.column("group_id"))
    reward, reward_valid = _float_column(table.column("reward"))
    call_reward, call_valid = _float_column(table.column("call_reward"))

    # First row of each rollout carries the rollout-level fields (reward and group are the same on every row).
    _, first_row = np.unique(row_rollout, return_index=True)  # codes are dense, so index == code
    rollout_group = row_group[first_row]
    rollout_reward = reward[first_row]
    rollout_reward_valid = reward_valid[first_row]

    call_sum = np.bincount(row_rollout, weights=np.where(call_valid, call_reward, 0.0), minlength=n_rollouts)
    call_count = np.bincount(row_rollout, weights=call_valid.astype(np.float64), minlength=n_rollouts)
    value = np.where(rollout_reward_valid, rollout_reward, call_sum)
    has_value = rollout_reward_valid | (call_count > 0)

    credited = np.where(call_valid, call_reward, value[row_rollout])
    return {
        "row_rollout": row_rollout,
        "rollout_group": rollout_group,
        "value": value,
        "has_value": has_value,
        "credited": credited,
    }


def group_statistics(values: np.ndarray, groups: np.ndarray, n_groups: int) -> dict[str, np.ndarray]:
    """Count, sum, mean and sample std (ddof=1; 0 for a single rollout) of `values` per group code."""
    count = np.bincount(groups, minlength=n_groups).astype(np.float64)
    total = np.bincount(groups, weights=values, minlength=n_groups)
    mean = np.divide(total, count, out=np.zeros(n_groups), where=count > 0)
    sq_dev = np.bincount(groups, weights=(values - mean[groups]) ** 2, minlength=n_groups)
    std = np.sqrt(np.divide(sq_dev, count - 1, out=np.zeros(n_groups), where=count > 1))
    return {"count": count, "sum": total, "mean": mean, "std": std}


def rollout_baselines(
    value: np.ndarray, group: np.ndarray, n_groups: int, cfg: AlgorithmConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(baseline, scale) per rollout for `cfg.name`; advantage = (credited reward - baseline) / scale."""
    stats = group_statistics(value, group, n_groups)
    zero_var = (stats["count"] < 2) | (stats["std"] <= ZERO_STD)
    if cfg.name == "grpo":
        baseline = stats["mean"][group]
        use_std = cfg.norm_std & ~zero_var[group]
        scale = np.where(use_std, stats["std"][group], 1.0)
    elif cfg.name == "dr_grpo":
        baseline = stats["mean"][group]
        scale = np.ones_like(value)
    elif cfg.name == "rloo":
        n = stats["count"][group]
        others = np.divide(stats["sum"][group] - value, n - 1, out=value.copy(), where=n > 1)
        baseline, scale = others, np.ones_like(value)
    elif cfg.name == "reinforce_pp":
        mean = value.mean() if len(value) else 0.0
        std = value.std(ddof=1) if len(value) > 1 else 0.0
        baseline = np.full_like(value, mean)
        scale = np.full_like(value, std if std > ZERO_STD else 1.0)
    else:
        raise ValueError(f"algorithm.name: unknown algorithm {cfg.name!r}")
    return baseline, scale


def compute_advantages(table: pa.Table, cfg: AlgorithmConfig) -> tuple[pa.Table, dict[str, Any]]:
    """Add a float32 `advantage` column; drop rows without a reward and, by config, zero-variance groups.

    Returns the new table (row order kept) and metrics about the groups.
    """
    parts = rollout_rewards(table)
    value, has_value = parts["value"], parts["has_value"]
    group = parts["rollout_group"]
    n_groups = int(group.max()) + 1 if len(group) else 0

    # Statistics only over rollouts that have a reward; the rest are dropped below.
    stats = group_statistics(value[has_value], group[has_value], n_groups)
    zero_var = (stats["count"] < 2) | (stats["std"] <= ZERO_STD)
    keep_rollout = has_value.copy()
    if cfg.drop_zero_variance:
        keep_rollout &= ~zero_var[group]

    baseline = np.zeros_like(value)
    scale = np.ones_like(value)
    b, s = rollout_baselines(value[keep_rollout], group[keep_rollout], n_groups, cfg)
    baseline[keep_rollout], scale[keep_rollout] = b, s

    row_rollout = parts["row_rollout"]
    keep_row = keep_rollout[row_rollout]
    advantage = (parts["credited"] - baseline[row_rollout]) / scale[row_rollout]

    present = stats["count"] > 0
    metrics = {
        "groups": int(present.sum()),
        "groups_zero_variance": int((present & zero_var).sum()),
        "groups_dropped": int((present & zero_var).sum()) if cfg.drop_zero_variance else 0,
        "rollouts": int(has_value.sum()),
        "rollouts_without_reward": int((~has_value).sum()),
        "rows": int(table.num_rows),
        "rows_kept": int(keep_row.sum()),
        "reward_mean": float(value[has_value].mean()) if has_value.any() else float("nan"),
        "reward_std": float(value[has_value].std()) if has_value.any() else float("nan"),
        "advantage_abs_mean": float(np.abs(advantage[keep_row]).mean()) if keep_row.any() else 0.0,
    }
    out = table
    if ADVANTAGE_COLUMN in out.column_names:
        out = out.drop_columns([ADVANTAGE_COLUMN])
    out = out.append_column(ADVANTAGE_COLUMN, pa.array(advantage.astype(np.float32), type=pa.float32()))
    if not keep_row.all():
        out = out.filter(pa.array(keep_row))
    return out, metrics
