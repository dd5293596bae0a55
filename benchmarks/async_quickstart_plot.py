"""Quickstart, synchronous vs asynchronous: train reward and held-out success against wall-clock time.

    flock /tmp/lr-heavy.lock lightning-ray train configs/quickstart.yaml trainer.max_staleness=0
    flock /tmp/lr-heavy.lock lightning-ray train configs/quickstart.yaml trainer.max_staleness=1 \\
        algorithm.old_logprobs=decoupled
    python -m benchmarks.async_quickstart_plot runs/quickstart/train-<K0> runs/quickstart/train-<K1>

Writes `benchmarks/results/async_quickstart.png` and `.json`. Each run's summary is
`benchmarks.quickstart_curve.summarize` (config, held-out curve by step, wall time, per-step metrics); on top
of it, the time of every logged step and the comparison the issue asks for: held-out success at equal
wall-clock time.

Time axis: seconds since the first training step started, i.e. the running sum of `time/step_s` (each step's
validation and checkpoint included), with the untrained model's validation (step 0) at 0. Start-up (Ray, vLLM,
workers, learner) and the step-0 validation are left out; they cost the same in both runs. When the rows carry
`time/elapsed_s` (seconds since the run started), that is used instead, start-up included.

At equal wall-clock time: the horizon is the shorter run's last step; for each run the last and the best
held-out success logged by then, and its success at each of K = 0's validation times (the last it had logged
by then) with their mean. K = 1 may become the quickstart default only if neither its last held-out success by
the horizon nor that mean is lower than K = 0's (`k1_not_lower`): one validation of 100 tasks is too noisy
to decide on alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from benchmarks.quickstart_curve import RESULTS, summarize
from lightning_ray.monitor.run_log import read_metrics

REWARD, SUCCESS = "rollout/reward_mean", "val/success_rate"


def step_times(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Seconds from the start of training to the end of each logged step (see the module docstring)."""
    if rows and all(r.get("time/elapsed_s") is not None for r in rows):
        return {r["step"]: float(r["time/elapsed_s"]) for r in rows}
    times, t = {}, 0.0
    for r in rows:
        t += r.get("time/step_s") or 0.0
        times[r["step"]] = round(t, 2)
    return times


def max_staleness(run_dir: Path) -> int:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return int(cfg.get("trainer", {}).get("max_staleness", 0))


def series(rows: list[dict[str, Any]], times: dict[int, float], key: str) -> list[tuple[float, float]]:
    return [(times[r["step"]], r[key]) for r in rows if r.get(key) is not None]


def by_horizon(points: list[tuple[float, float]], horizon: float) -> dict[str, float | None]:
    seen = [v for t, v in points if t <= horizon + 1e-6]
    return {"last": seen[-1] if seen else None, "best": max(seen) if seen else None}


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Held-out success of each run by the time the shorter run ended, and at each validation of the first."""
    horizon = min(r["time_s_by_step"][max(r["time_s_by_step"])] for r in runs)
    out: dict[str, Any] = {"horizon_s": horizon}
    for r in runs:
        out[r["label"]] = by_horizon(r["val_success_by_time"], horizon)
    base, other = runs
    points = [
        {"time_s": t, base["label"]: v, other["label"]: by_horizon(other["val_success_by_time"], t)["last"]}
        for t, v in base["val_success_by_time"]
        if t <= horizon + 1e-6
    ]
    out["at_each_validation_of_" + base["label"]] = points
    means = {r["label"]: sum(p[r["label"]] or 0.0 for p in points) / len(points) for r in runs}
    out["mean_over_those_validations"] = means
    a, b = (out[r["label"]]["last"] for r in runs)
    out["k1_not_lower"] = (
        None if a is None or b is None else b >= a and means[other["label"]] >= means[base["label"]]
    )
    return out


def plot(runs: list[dict[str, Any]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for color, r in zip(("C0", "C1", "C2", "C3"), runs, strict=False):
        for points, style in ((r["reward_by_time"], "reward"), (r["val_success_by_time"], "success")):
            if not points:
                continue
            xs = [t / 60 for t, _ in points]
            ys = [v for _, v in points]
            if style == "reward":
                ax.plot(xs, ys, color=color, alpha=0.45, lw=1.2, label=f"{r['label']}: train reward (mean)")
            else:
                ax.plot(xs, ys, color=color, marker="o", lw=2, label=f"{r['label']}: held-out success")
    ax.set_xlabel("wall-clock minutes since the first training step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_k0", type=Path, help="run directory of the synchronous quickstart (K = 0)")
    parser.add_argument("run_k1", type=Path, help="run directory of the asynchronous quickstart (K = 1)")
    parser.add_argument("--note", default="2 CPU cores, 24 GiB, nothing else running")
    parser.add_argument("--name", default="async_quickstart")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    runs = []
    for run_dir in (args.run_k0, args.run_k1):
        rows = read_metrics(run_dir / "metrics.jsonl")
        if not rows:
            parser.error(f"{run_dir}: no metrics.jsonl rows")
        times = step_times(rows)
        k = max_staleness(run_dir)
        runs.append(
            {
                "label": f"K={k}",
                "run_dir": str(run_dir),
                "max_staleness": k,
                "time_source": "time/elapsed_s" if "time/elapsed_s" in rows[-1] else "cumulative time/step_s",
                "time_s_by_step": times,
                "reward_by_time": series(rows, times, REWARD),
                "val_success_by_time": series(rows, times, SUCCESS),
                **summarize(run_dir, rows, args.note),
            }
        )
    if runs[0]["label"] == runs[1]["label"]:
        runs[0]["label"], runs[1]["label"] = (f"{r['label']} ({Path(r['run_dir']).name})" for r in runs)
    result = {"at_equal_wall_clock": compare(runs), "runs": runs}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(
        runs,
        args.out_dir / f"{args.name}.png",
        title="quickstart: SmolLM2-135M, calc agent, GRPO on CPU, synchronous vs asynchronous",
    )
    eq = result["at_equal_wall_clock"]
    for r in runs:
        curve = " ".join(f"{t / 60:.1f}m:{v:.0%}" for t, v in r["val_success_by_time"])
        print(f"{r['label']}: held-out success by time {curve}; wall {r['wall_s']:.0f} s (start-up included)")
    print(
        f"by {eq['horizon_s'] / 60:.1f} min: "
        + ", ".join(f"{r['label']} last {eq[r['label']]['last']} best {eq[r['label']]['best']}" for r in runs)
        + f"; mean at K=0's validations {eq['mean_over_those_validations']}; K=1 not lower: {eq['k1_not_lower']}"
    )
    print(f"wrote {args.out_dir / (args.name + '.json')} and .png")


if __name__ == "__main__":
    main()
