"""Which trajectories SFT (`algorithm.name: sft`) trains on: rejection sampling over GRPO-style groups.

Per group, the rollouts that succeeded and whose reward reaches `sft.min_reward` pass; of those, the
`sft.per_group` best train (ties: the first in the table), the best of G samples per task when it is 1. A
rollout's reward is its value as the advantages see it (`rollout_rewards`: the returned reward, else the sum of
its emitted ones). Every other rollout gets a reason, which the ledger records:

- `failed`: it did not succeed (the ledger enters it as failed, with its kind);
- `no_reward`: it has neither a returned nor an emitted reward;
- `below_min_reward`: its reward is under `sft.min_reward`;
- `not_best`: it passed, but `per_group` better ones of its group train.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lightning_ray.algorithms.advantages import rollout_rewards


def select_best(
    table: pa.Table, min_reward: float, per_group: int | None
) -> tuple[pa.Table, dict[str, str], dict[str, Any]]:
    """The rows of the rollouts that train, the reason each other rollout of `table` does not (by rollout id),
    and metrics: rollouts and groups seen and kept, and the kept rollouts' mean reward."""
    if table.num_rows == 0:
        return table, {}, {"rollouts": 0, "rollouts_kept": 0, "groups": 0, "groups_kept": 0}
    parts = rollout_rewards(table)
    value, has_value, group = parts["value"], parts["has_value"], parts["rollout_group"]
    row_rollout = parts["row_rollout"]
    ids = table.column("rollout_id").combine_chunks().dictionary_encode().dictionary.to_pylist()
    n = len(ids)
    first_row = np.unique(row_rollout, return_index=True)[1]
    succeeded = pc.equal(table.column("status"), "succeeded").to_numpy(zero_copy_only=False)[first_row]
    passing = succeeded & has_value & (value >= min_reward)

    # Rank within the group: passing ones first, the highest reward first, then table order.
    order = np.lexsort((np.arange(n), -value, ~passing, group))
    sorted_group = group[order]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.searchsorted(sorted_group, sorted_group, side="left")
    keep = passing & (rank < per_group) if per_group is not None else passing

    reasons = np.select(
        [~succeeded, ~has_value, value < min_reward], ["failed", "no_reward", "below_min_reward"], "not_best"
    )
    dropped = {ids[i]: str(reasons[i]) for i in np.flatnonzero(~keep)}
    metrics = {
        "rollouts": n,
        "rollouts_kept": int(keep.sum()),
        "groups": len(np.unique(group)),
        "groups_kept": len(np.unique(group[keep])),
    }
    if keep.any():
        metrics["reward_mean_kept"] = float(value[keep].mean())
    kept_rows = keep[row_rollout]
    return (table if kept_rows.all() else table.filter(pa.array(kept_rows))), dropped, metrics
