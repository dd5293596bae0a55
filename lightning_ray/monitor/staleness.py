"""How far behind the trained policy the trained tokens were: the histogram the async pipeline is judged by."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def token_versions(table: pa.Table) -> np.ndarray:
    """The policy version of every generated response token (a merged row's inserted tokens, which carry no
    loss, left out)."""
    versions = pc.list_flatten(table["response_versions"]).to_numpy(zero_copy_only=False)
    if "loss_mask" in table.column_names:
        versions = versions[pc.list_flatten(table["loss_mask"]).to_numpy(zero_copy_only=False) > 0]
    return versions


def staleness_metrics(table: pa.Table, version: int) -> dict[str, Any]:
    """For the tokens of `table`, trained as version `version`: the share `k` versions behind for each k seen,
    the mean and the largest lag."""
    behind = version - token_versions(table)
    if not len(behind):
        return {}
    lags, counts = np.unique(behind, return_counts=True)
    out: dict[str, Any] = {
        f"staleness/tokens_behind_{int(k)}": c / len(behind) for k, c in zip(lags, counts, strict=True)
    }
    out["staleness/mean"] = float(behind.mean())
    out["staleness/max"] = int(behind.max())
    return out


def stale_share(ended: dict[str, int]) -> dict[str, float]:
    """The share of the rollouts that reached the ledger this step (trained, dropped or failed) that were dropped
    for staleness. Groups are dropped whole, so with groups of one size it is also the share of groups."""
    total = sum(ended.values())
    return {"staleness/dropped_share": ended.get("dropped/stale", 0) / total} if total else {}
