"""Where every rollout a training run started ended: trained, dropped with a reason, or failed with a kind.

One JSON line per rollout in `RUN_DIR/ledger.jsonl`, written when its end is known; a rollout is entered once,
whatever is reported after. `--resume` keeps the lines of the steps the checkpoint covers and forgets the rest
(those steps run again), so the file always describes the run that the checkpoints continue. The entries of
one call are appended with one write; a full disk is `RunFileWriteError` and leaves the file as it was.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning_ray.monitor.run_log import read_json_lines
from lightning_ray.run_files import append_bytes, replace_file
from lightning_ray.tasks.records import cut_reason

OUTCOMES = ("trained", "dropped", "failed")


class Ledger:
    def __init__(self, path: Path, keep_before_version: int | None = None):
        self.path = path
        self.entered: set[str] = set()
        self.counts: Counter[str] = Counter()  # since the last `take_counts`
        self.totals: Counter[str] = Counter()  # since this process opened the ledger
        entries = read_json_lines(path) if keep_before_version is not None and path.exists() else []
        kept = [e for e in entries if e["version"] < keep_before_version]
        text = "".join(json.dumps(e) + "\n" for e in kept)
        replace_file(path, lambda tmp: tmp.write_text(text), f"rewriting {len(kept)} entries for the resume")
        self.entered.update(e["rollout_id"] for e in kept)
        self.kept = len(kept)

    def trained(self, records: Iterable[Any], version: int) -> None:
        """The rollouts of groups version `version` trained on (those that failed are `failed`)."""
        self._enter(records, "trained", None, version)

    def dropped(self, records: Iterable[Any], reason: str, version: int, unstarted: bool = False) -> None:
        """Rollouts not trained for `reason` (those that failed are `failed`, those of a cut group are dropped
        for the cut's reason); with `unstarted`, those the pool abandoned because they had not run yet (the end
        of the run) are dropped too, not failed."""
        self._enter(records, "dropped", reason, version, unstarted)

    def _enter(
        self, records: Iterable[Any], outcome: str, reason: str | None, version: int, unstarted: bool = False
    ) -> None:
        entries: dict[str, dict[str, Any]] = {}  # by rollout id: a rollout listed twice is entered once
        for r in records:
            if r.rollout_id in self.entered or r.rollout_id in entries:
                continue
            kept = r.status == "succeeded" or (unstarted and r.status == "abandoned" and r.attempts == 0)
            end = outcome if kept else "failed"
            why = reason if end != "failed" else (r.kind or r.status)
            if cut := cut_reason(r):  # its group was cut before it ended: dropped, for the cut's reason
                end, why = "dropped", cut
            entries[r.rollout_id] = {
                "rollout_id": r.rollout_id,
                "group_id": r.group_id,
                "task_id": r.task_id,
                "outcome": end,
                "reason": why,
                "version": version,
                "attempts": r.attempts,
            }
        if not entries:
            return
        data = "".join(json.dumps(e) + "\n" for e in entries.values()).encode()
        append_bytes(self.path, data, f"appending {len(entries)} rollouts")  # entered only once written
        for e in entries.values():
            self.entered.add(e["rollout_id"])
            key = f"{e['outcome']}/{e['reason']}" if e["reason"] else e["outcome"]
            self.counts[key] += 1
            self.totals[key] += 1

    def take_counts(self) -> dict[str, int]:
        """Rollouts entered since the last call, by `outcome` or `outcome/reason`."""
        counts, self.counts = dict(self.counts), Counter()
        return counts


def accounting(ledger: Ledger, started: int, leases: int) -> dict[str, Any]:
    """Where the rollouts this process started went: trained, dropped by reason, failed by kind, and `lost`,
    those that reached none of the three (it must be 0). `started` counts the rollouts of this process's
    stream, those of complete groups a resume brought back included; `leases`, the attempts handed out."""
    by: dict[str, dict[str, int]] = {"dropped": {}, "failed": {}}
    trained = 0
    for key, n in sorted(ledger.totals.items()):
        outcome, _, why = key.partition("/")
        if outcome == "trained":
            trained += n
        else:
            by[outcome][why or "unknown"] = by[outcome].get(why or "unknown", 0) + n
    ended = sum(ledger.totals.values())
    return {
        "started": started,
        "leases": leases,
        "trained": trained,
        "dropped": by["dropped"],
        "failed": by["failed"],
        "lost": started - ended,
        "before_resume": ledger.kept,
    }


def accounting_line(acc: dict[str, Any]) -> str:
    def parts(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {n}" for k, n in d.items()) or "none"

    return (
        f"rollouts: {acc['started']} started ({acc['leases']} leases), {acc['trained']} trained, dropped "
        f"{sum(acc['dropped'].values())} ({parts(acc['dropped'])}), failed {sum(acc['failed'].values())} "
        f"({parts(acc['failed'])}), lost {acc['lost']}"
    )


def read_ledger(path: Path) -> list[dict[str, Any]]:
    return read_json_lines(path)
