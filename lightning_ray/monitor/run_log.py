"""Per-step metrics of a training run: metrics.jsonl in the run directory, wandb, and the HTML report.

wandb runs offline unless a key is configured (`WANDB_API_KEY` and `logging.wandb_mode: online`), so a run
on a machine without network still keeps its wandb files.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from lightning_ray.config import Config

CURVES = [
    ("rollout/reward_mean", "train reward (mean)"),
    ("val/reward_mean", "held-out reward (greedy)"),
    ("val/success_rate", "held-out success (greedy)"),
]


class RunLog:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False):
        self.cfg, self.run_dir = cfg, run_dir
        self.path = run_dir / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = read_metrics(self.path) if resume else []
        self.wandb = None
        if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.wandb_project,
                name=f"{cfg.trainer.name}-{run_dir.name}",
                dir=str(run_dir),
                mode=cfg.logging.wandb_mode,
                config=cfg.model_dump(),
                resume="allow" if resume else None,
                id=run_dir.name.replace(".", "-"),
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.rows = [r for r in self.rows if r["step"] != step] + [row]
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def close(self) -> None:
        if self.cfg.logging.report:
            write_report(self.rows, self.run_dir / "report.html", title=self.cfg.trainer.name)
        if self.wandb is not None:
            self.wandb.finish()


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The last row of each step (a resumed run may repeat a step it had logged before stopping)."""
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def step_line(step: int, total: int, m: dict[str, Any]) -> str:
    """The one-line summary printed after each step; the sync part names the policy version the replicas now
    serve (`sync v3 0.61s`), so a user sees that each weight update landed."""

    def f(key: str, fmt: str = ".3f") -> str:
        v = m.get(key)
        return "-" if v is None else format(v, fmt)

    version = "" if m.get("sync/version") is None else f" v{m['sync/version']}"
    # Staleness in a few characters: the largest lag of a trained token and the share of tokens that lagged.
    lag = m.get("staleness/max")
    behind = 1.0 - m.get("staleness/tokens_behind_0", 1.0)
    stale = "" if not lag else f" | lag<={lag} {behind:.0%}"
    return (
        f"step {step}/{total} | reward {f('rollout/reward_mean')} | ok {f('rollout/success_rate', '.0%')} "
        f"| val {f('val/success_rate', '.0%')} | loss {f('learner/loss', '.4f')} | kl {f('learner/kl', '.4f')} "
        f"| clip {f('learner/clip_frac', '.3f')} | rollout {f('time/rollout_s', '.1f')}s "
        f"learner {f('time/learner_s', '.1f')}s sync{version} {f('time/broadcast_s', '.2f')}s{stale}"
    )


def plot_curves(rows: list[dict[str, Any]], out: Path | io.BytesIO, title: str = "") -> None:
    """Reward and held-out success per step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key, label in CURVES:
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if key.startswith("val") else None, label=label)
    ax.set_xlabel("GRPO step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


def write_report(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    """A single self-contained HTML page: the curves and a table of every logged metric."""
    png = io.BytesIO()
    plot_curves(rows, png, title)
    keys = sorted({k for r in rows for k in r if k != "step"})
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["step", *keys])
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(r.get(k))}</td>" for k in ["step", *keys]) + "</tr>" for r in rows
    )
    out.write_text(
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<h1>{html.escape(title)}</h1>"
        f"<img alt='curves' src='data:image/png;base64,{base64.b64encode(png.getvalue()).decode()}'>"
        f"<table border=1 cellspacing=0 cellpadding=3><tr>{head}</tr>{body}</table>"
    )


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape("" if v is None else str(v))
