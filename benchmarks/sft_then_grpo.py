"""SFT on the calc agent's own successful trajectories, then GRPO, against GRPO alone (issue 15, item 2).

Three runs of `configs/quickstart.yaml` (SmolLM2-135M, the calc agent), held-out success on one plot:

1. SFT by rejection sampling (`algorithm.name: sft`, `sft.source: rollouts`): each step samples
   `algorithm.group_size` rollouts of `trainer.tasks_per_step` tasks and trains on the best of each group that
   solved its task (`sft.min_reward: 1.0`); `--sft-from RUN_DIR ...` trains on the successful trajectories of
   earlier runs instead (`sft.source: files`);
2. GRPO from the SFT run's last checkpoint;
3. GRPO alone from the base model, as many steps as 1 and 2 together.

    python -m benchmarks.sft_then_grpo                                  # 10 SFT + 20 GRPO steps vs 30 GRPO
    python -m benchmarks.sft_then_grpo --sft-steps 3 --grpo-steps 3 --val-limit 30 --name sft_then_grpo_small

Writes benchmarks/results/NAME.json (the curves, wall times, configs) and NAME.png, and prints the numbers.
Extra `key.sub=value` arguments override all three runs' config (`trainer.val_every=2`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from lightning_ray.checkpoints import latest_checkpoint
from lightning_ray.config import load_config
from lightning_ray.loop import train

RESULTS = Path(__file__).parent / "results"
CONFIG = Path(__file__).parents[1] / "configs" / "quickstart.yaml"


def run(name: str, overrides: list[str]) -> dict[str, Any]:
    """One training run: its held-out success by step, wall time and run directory."""
    cfg = load_config(CONFIG, [f"trainer.name={name}", *overrides])
    t0 = time.perf_counter()
    rows = train(cfg)
    wall = time.perf_counter() - t0
    run_dir = Path(cfg.trainer.run_dir) / name
    run_dir = max(run_dir.iterdir(), key=lambda p: p.stat().st_mtime)
    val = {r["step"]: r["val/success_rate"] for r in rows if "val/success_rate" in r}
    print(f"{name}: held-out success by step {val}, {wall:.0f} s ({run_dir})", flush=True)
    return {"run_dir": str(run_dir), "wall_s": round(wall, 1), "val_success_by_step": val, "rows": rows}


def last(run_: dict[str, Any]) -> float:
    """The held-out success at a run's last validation."""
    curve = run_["val_success_by_step"]
    return curve[max(curve)]


def plot(sft: dict, then: dict, alone: dict, sft_steps: int, out: Path, title: str) -> None:
    """Held-out success against training steps: SFT's steps, then GRPO's after them; GRPO alone from 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    chained = {
        **sft["val_success_by_step"],
        **{sft_steps + s: v for s, v in then["val_success_by_step"].items()},
    }
    for curve, label in ((chained, "SFT, then GRPO"), (alone["val_success_by_step"], "GRPO alone")):
        steps = sorted(curve)
        ax.plot(steps, [curve[s] for s in steps], marker="o", label=label)
    ax.axvline(sft_steps, color="grey", linestyle=":", label="SFT -> GRPO")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out success (greedy)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sft-steps", type=int, default=10)
    parser.add_argument("--grpo-steps", type=int, default=20)
    parser.add_argument("--val-every", type=int, default=5)
    parser.add_argument("--val-limit", type=int, default=100)
    parser.add_argument("--sft-lr", type=float, default=1e-5)
    parser.add_argument("--sft-from", nargs="*", default=None, help="run directories: SFT from their files")
    parser.add_argument("--name", default="sft_then_grpo")
    parser.add_argument("--note", default="2 CPU cores, 24 GiB")
    parser.add_argument("overrides", nargs="*", help="key.sub=value for all three runs")
    args = parser.parse_args()

    common = [f"trainer.val_every={args.val_every}", f"trainer.val_limit={args.val_limit}", *args.overrides]
    sft_overrides = ["algorithm.name=sft", "sft.min_reward=1.0", f"learner.lr={args.sft_lr}"]
    if args.sft_from:
        sft_overrides += ["sft.source=files", f"sft.files={json.dumps(args.sft_from)}"]
    sft = run(f"{args.name}-sft", [*common, *sft_overrides, f"trainer.steps={args.sft_steps}"])
    checkpoint = latest_checkpoint(Path(sft["run_dir"]))
    then = run(
        f"{args.name}-grpo-after-sft",
        [*common, f"model.path={checkpoint}", f"trainer.steps={args.grpo_steps}"],
    )
    alone = run(f"{args.name}-grpo", [*common, f"trainer.steps={args.sft_steps + args.grpo_steps}"])

    code = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    out = {
        "code": code,
        "machine": args.note,
        "config": str(CONFIG.relative_to(CONFIG.parents[1])),
        "overrides": {"common": common, "sft": sft_overrides},
        "sft_steps": args.sft_steps,
        "grpo_steps": args.grpo_steps,
        "sft": {k: v for k, v in sft.items() if k != "rows"},
        "sft_steps_metrics": [
            {k: v for k, v in r.items() if k.startswith(("step", "sft/"))} for r in sft["rows"]
        ],
        "grpo_after_sft": {k: v for k, v in then.items() if k != "rows"},
        "grpo_alone": {k: v for k, v in alone.items() if k != "rows"},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(
        sft,
        then,
        alone,
        args.sft_steps,
        RESULTS / f"{args.name}.png",
        "calc agent, SmolLM2-135M: SFT then GRPO",
    )
    print(
        f"held-out success after {args.sft_steps + args.grpo_steps} steps: SFT then GRPO {last(then):.0%} "
        f"(after SFT alone {last(sft):.0%}), GRPO alone {last(alone):.0%}; wall {sft['wall_s'] + then['wall_s']:.0f} s "
        f"vs {alone['wall_s']:.0f} s; results/{args.name}.json"
    )


if __name__ == "__main__":
    main()
