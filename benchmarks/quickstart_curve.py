"""Commit a training run's curve: `benchmarks/results/quickstart.json` and `quickstart.png` from its metrics.

    lightning-ray train configs/quickstart.yaml
    python -m benchmarks.quickstart_curve runs/quickstart/train-<timestamp> --note "what else was on the box"

The JSON keeps the per-step rollout, advantage, learner, validation and timing metrics, the held-out gain,
and the wall time from the run directory's creation (start-up included) to its last metrics row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import yaml

from lightning_ray.monitor.run_log import plot_curves, read_metrics

RESULTS = Path(__file__).parent / "results"
KEPT = ("rollout/", "advantage/", "learner/", "val/", "time/")


def summarize(run_dir: Path, rows: list[dict], note: str) -> dict:
    """The run's held-out curve, its gain over the untrained model and its wall time."""
    val = [(r["step"], r["val/success_rate"]) for r in rows if "val/success_rate" in r]
    wall = (run_dir / "metrics.jsonl").stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    return {
        "config": yaml.safe_load((run_dir / "config.yaml").read_text()),
        "code": code.strip(),
        "machine": note,
        "held_out": "greedy; solved = reward >= trainer.success_threshold (the correct number in <answer> tags)",
        "val_success_by_step": dict(val),
        "val_success_start": val[0][1] if val else None,
        "val_success_best": max(v for _, v in val) if val else None,
        "val_success_last": val[-1][1] if val else None,
        "wall_s": round(wall, 1),
        "steps": [{k: v for k, v in r.items() if k == "step" or k.startswith(KEPT)} for r in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--note", default="2 CPU cores, 24 GiB, nothing else running")
    parser.add_argument("--name", default="quickstart")
    args = parser.parse_args()
    rows = read_metrics(args.run_dir / "metrics.jsonl")
    out = summarize(args.run_dir, rows, args.note)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    plot_curves(
        rows, RESULTS / f"{args.name}.png", title=f"{args.name}: SmolLM2-135M, calc agent, GRPO on CPU"
    )
    print(
        f"held-out success {out['val_success_start']} -> {out['val_success_last']} "
        f"(best {out['val_success_best']}) in {len(rows) - 1} steps, {out['wall_s']:.0f} s"
    )


if __name__ == "__main__":
    main()
