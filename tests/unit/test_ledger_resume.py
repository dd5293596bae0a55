"""ledger.jsonl survives a crash: a line cut in half (the driver killed, or the disk full, mid-append) is
skipped with a warning by `--resume` and by its readers (`sft.trained_only` too), instead of stopping them."""

from __future__ import annotations

import json
import logging

from lightning_ray.data.sft_files import trained_rollouts
from lightning_ray.rollouts.ledger import Ledger, read_ledger


def entry(rollout_id: str, version: int) -> str:
    return json.dumps({"rollout_id": rollout_id, "outcome": "trained", "reason": None, "version": version})


def test_a_resume_skips_a_ledger_line_cut_in_half(tmp_path, caplog):
    path = tmp_path / "ledger.jsonl"
    path.write_text(f"{entry('r1', 0)}\n{entry('r2', 1)}\n" + '{"rollout_id": "r3", "outc')
    with caplog.at_level(logging.WARNING):
        assert [e["rollout_id"] for e in read_ledger(path)] == ["r1", "r2"]
        assert trained_rollouts(tmp_path / "trajectories" / "step-000001.parquet") == {"r1", "r2"}
        ledger = Ledger(path, keep_before_version=1)  # resuming from the checkpoint of step 1
    assert f"{path}: line 3 is cut off or corrupt, skipped" in caplog.text
    assert (ledger.kept, ledger.entered) == (1, {"r1"})
    assert path.read_text() == f"{entry('r1', 0)}\n"
