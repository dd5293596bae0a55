"""The live-learning demo (benchmarks/live_demo.py) for one minute on the tiny model: the server starts, the
scripted user's requests are answered and rewarded, the loop trains on the groups, the held-out checks see the
served versions, and the server and the Ray cluster the demo started are stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~4 min (a Ray cluster, two replicas, a learner, a minute of traffic); CI covers serve --learn
# with test_live_gateway.py and the scorer with tests/unit/test_calc_live_scorer.py
def test_live_demo_one_minute_on_the_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "live_demo"
    overrides = [
        f"model.path={tiny_model_dir}",
        "model.dtype=float32",
        "inference.max_model_len=1024",
        "inference.sampling.max_tokens=16",
        "inference.canary=null",
        "live.group_fraction=1.0",  # every request a group: a step within the minute
        "algorithm.drop_zero_variance=false",  # a random model earns 0 everywhere: train on it anyway
        "learner.precision=float32",
        f"trainer.run_dir={tmp_path / 'runs'}",
    ]
    command = [sys.executable, "-m", "benchmarks.live_demo", "--minutes", "1", "--eval-every", "0.5"]
    command += ["--eval-n", "8", "--out", str(out), *overrides]
    subprocess.run(command, cwd=REPO, check=True, timeout=540)

    result = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    held = result["held_out"]
    assert len(held) >= 2 and all(p["n"] == 8 for p in held)
    assert result["user"]["rewarded"] > 0, result["user"]
    run = result["run"]
    assert run["steps_done"] >= 1, run
    assert run["live_rollouts_ended"].get("rewarded", 0) > 0, run
    assert run["summary"] is not None  # the server stopped through its own shutdown path
    versions = {int(v) for p in held for v in p["by_version"]}
    assert 0 in versions and max(versions) <= run["steps_done"], held
