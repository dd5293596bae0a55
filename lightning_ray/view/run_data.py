"""What the run page reads: a run directory's metrics.jsonl, summary.json and trajectory Parquet files.

Everything comes from files, so the page works while a run writes them, after it, and on a copied run
directory. A step's two files (`step-NNNNNN-rollouts.parquet`: one row per rollout; `step-NNNNNN.parquet`: one
row per LLM call) are read once and read again only when their size or mtime changes; the rollout list reads
only the small columns (no token ids, logs or tracebacks), and one rollout's calls are read on demand with a
row filter, so a run with 100k recorded calls stays responsive (`tests/unit/test_view_data.py` measures it).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lightning_ray.monitor.run_log import read_metrics
from lightning_ray.monitor.summary import BatchSummary, summarize_batch

STEP_FILE = re.compile(r"step-(\d+)-rollouts\.parquet$")
INDEX_COLUMNS = [
    "rollout_id",
    "task_id",
    "group_id",
    "attempt",
    "status",
    "failure_kind",
    "error_type",
    "error_message",
    "reward",
    "num_calls",
    "duration_s",
    "worker",
]
PAGE_SIZE = 50


@dataclass(frozen=True)
class Filters:
    """The trajectory browser's filters; None matches everything. `failure` is a kind, or "none" (no
    failure) or "any" (some failure); `task` matches a part of the task id."""

    step: int | None = None
    task: str | None = None
    min_reward: float | None = None
    max_reward: float | None = None
    failure: str | None = None
    role: str | None = None
    group: str | None = None

    def mask(self, index: pa.Table) -> pa.ChunkedArray | None:
        conditions = []
        if self.step is not None:
            conditions.append(pc.equal(index["step"], self.step))
        if self.task:
            conditions.append(pc.match_substring(index["task_id"], self.task))
        if self.min_reward is not None:
            conditions.append(pc.greater_equal(index["reward"], self.min_reward))
        if self.max_reward is not None:
            conditions.append(pc.less_equal(index["reward"], self.max_reward))
        if self.failure == "none":
            conditions.append(pc.is_null(index["failure_kind"]))
        elif self.failure == "any":
            conditions.append(pc.is_valid(index["failure_kind"]))
        elif self.failure:
            conditions.append(pc.equal(index["failure_kind"], self.failure))
        if self.role:
            conditions.append(pc.match_substring(index["roles"], f",{self.role},"))
        if self.group:
            conditions.append(pc.equal(index["group_id"], self.group))
        if not conditions:
            return None
        mask = conditions[0]
        for c in conditions[1:]:
            mask = pc.and_kleene(mask, c)
        return pc.fill_null(mask, False)


@dataclass(frozen=True)
class Page:
    rows: list[dict[str, Any]]
    total: int
    page: int
    pages: int


class RunData:
    """One run directory, read through a cache of its Parquet files (thread-safe: the page's server answers
    requests on several threads)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise FileNotFoundError(f"run directory {self.run_dir} does not exist")
        self._steps: dict[int, tuple[tuple, pa.Table]] = {}
        self._lock = threading.Lock()

    # ---- the run as a whole ----------------------------------------------------------------------------

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.run_dir / "metrics.jsonl")

    def summary(self) -> dict[str, Any] | None:
        """summary.json, written when the run ends (None while it runs)."""
        path = self.run_dir / "summary.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def failures(self) -> tuple[BatchSummary, dict[str, dict[str, Any]]]:
        """Failures of every recorded rollout by kind, and their recurring patterns, each with the traceback
        of its example rollout (read only for the examples); and the index rows of the examples by id."""
        index = self.index()
        failed = index.filter(pc.is_valid(index["failure_kind"])).to_pylist()
        records = [
            {
                "status": row["status"],
                "rollout_id": row["rollout_id"],
                "failure": {
                    "kind": row["failure_kind"],
                    "exc_type": row["error_type"],
                    "message": row["error_message"] or "",
                },
            }
            for row in failed
        ]
        summary = summarize_batch(records)
        where = {row["rollout_id"]: row for row in failed}
        patterns, examples = [], {}
        for p in summary.patterns:
            row = examples[p.example_rollout_id] = where[p.example_rollout_id]
            full = self.rollout_row(row["step"], row["rollout_id"], row["attempt"]) or {}
            patterns.append(replace(p, example_traceback=full.get("traceback") or ""))
        return replace(summary, patterns=patterns), examples

    # ---- the rollout index -------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        return sorted(
            int(m.group(1))
            for p in self._dir().glob("step-*-rollouts.parquet")
            if (m := STEP_FILE.search(p.name))
        )

    def index(self) -> pa.Table:
        """One row per recorded rollout, newest step first: `INDEX_COLUMNS`, its `step`, and `roles` (",a,b,": the roles of its
        calls, comma-fenced for an exact substring match)."""
        tables = [self._step_index(step) for step in reversed(self.steps())]
        tables = [t for t in tables if t is not None]
        return pa.concat_tables(tables) if tables else _empty_index()

    def page(self, filters: Filters, page: int = 1, size: int = PAGE_SIZE) -> Page:
        index = self.index()
        mask = filters.mask(index)
        rows = index if mask is None else index.filter(mask)
        total = rows.num_rows
        pages = max(1, -(-total // size))
        page = min(max(page, 1), pages)
        return Page(rows.slice((page - 1) * size, size).to_pylist(), total, page, pages)

    def roles(self) -> list[str]:
        roles = pc.unique(self.index()["roles"]).to_pylist()
        return sorted({r for fenced in roles if fenced for r in fenced.strip(",").split(",") if r})

    # ---- one rollout -------------------------------------------------------------------------------------

    def rollout_row(self, step: int, rollout_id: str, attempt: int) -> dict[str, Any] | None:
        """The rollout's row with everything (logs, traceback, reward dims)."""
        rows = _read_where(self._dir() / f"step-{step:06d}-rollouts.parquet", rollout_id, attempt)
        return rows[0] if rows else None

    def calls(self, step: int, rollout_id: str, attempt: int) -> list[dict[str, Any]]:
        """The rollout's LLM calls in order, every column."""
        rows = _read_where(self._dir() / f"step-{step:06d}.parquet", rollout_id, attempt)
        return sorted(rows, key=lambda r: r["call_index"])

    def group_calls(self, step: int, group_id: str) -> pa.Table:
        """Every call of one GRPO group (its rollouts' rows), for the advantages."""
        path = self._dir() / f"step-{step:06d}.parquet"
        if not path.exists():
            return pa.table({})
        return pq.read_table(path, filters=[("group_id", "=", group_id)])

    # ---- internals ---------------------------------------------------------------------------------------

    def _dir(self) -> Path:
        return self.run_dir / "trajectories"

    def _step_index(self, step: int) -> pa.Table | None:
        rollouts = self._dir() / f"step-{step:06d}-rollouts.parquet"
        calls = self._dir() / f"step-{step:06d}.parquet"
        key = (_stamp(rollouts), _stamp(calls))
        with self._lock:
            cached = self._steps.get(step)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            index = _build_step_index(step, rollouts, calls)
        except (OSError, pa.ArrowInvalid):  # the run is replacing the file right now: next refresh
            return cached[1] if cached else None
        with self._lock:
            self._steps[step] = (key, index)
        return index


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _build_step_index(step: int, rollouts_path: Path, calls_path: Path) -> pa.Table:
    rollouts = pq.read_table(rollouts_path, columns=INDEX_COLUMNS)
    if calls_path.exists():
        calls = pq.read_table(calls_path, columns=["rollout_id", "agent"])
        by_rollout = calls.group_by("rollout_id").aggregate([("agent", "distinct")])
        fenced = pc.binary_join_element_wise(",", pc.binary_join(by_rollout["agent_distinct"], ","), ",", "")
        roles = pa.table({"rollout_id": by_rollout["rollout_id"], "roles": fenced})
        rollouts = rollouts.join(roles, "rollout_id", join_type="left outer")
    else:
        rollouts = rollouts.append_column("roles", pa.nulls(rollouts.num_rows, pa.string()))
    rollouts = rollouts.sort_by([("group_id", "ascending"), ("rollout_id", "ascending")])
    step_col = pa.array([step] * rollouts.num_rows, pa.int64())
    return rollouts.add_column(0, "step", step_col).select(_index_names())


def _index_names() -> list[str]:
    return ["step", *INDEX_COLUMNS, "roles"]


def _empty_index() -> pa.Table:
    empty = pa.table({name: pa.array([], pa.string()) for name in _index_names()})
    return empty.set_column(0, "step", pa.array([], pa.int64()))


def _read_where(path: Path, rollout_id: str, attempt: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    table = pq.read_table(path, filters=[("rollout_id", "=", rollout_id), ("attempt", "=", attempt)])
    return table.to_pylist()
