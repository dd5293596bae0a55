"""Per-step metrics of a training run: metrics.jsonl in the run directory, wandb, and the HTML report.

wandb runs offline unless a key is configured (`WANDB_API_KEY` and `logging.wandb_mode: online`), so a run
on a machine without network still keeps its wandb files.

Each row of metrics.jsonl is appended with one write and flushed to disk, so a crash leaves at most the last
line cut in half: readers skip such a line with a warning, and a resumed run rewrites the file to one row per
step up to the checkpoint it resumes from (later steps are trained again, and logged again).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from lightning_ray.checkpoints import resume_plan
from lightning_ray.config import Config, public_dump
from lightning_ray.monitor.wandb_table import trajectory_table
from lightning_ray.run_files import append_bytes, replace_file

CURVES = [
    ("rollout/reward_mean", "train reward (mean)"),
    ("val/reward_mean", "held-out reward (greedy)"),
    ("val/success_rate", "held-out success (greedy)"),
]

log = logging.getLogger(__name__)


class RunLog:
    """metrics.jsonl, wandb and the report of one run. With `resume`, the log continues from the step of the
    checkpoint `--resume` continues from (`resume_metrics`)."""

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False):
        self.cfg, self.run_dir = cfg, run_dir
        self.path = run_dir / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = (
            resume_metrics(self.path, resume_plan(run_dir).step) if resume else []
        )
        self.wandb = None
        if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.wandb_project,
                name=f"{cfg.trainer.name}-{run_dir.name}",
                dir=str(run_dir),
                mode=cfg.logging.wandb_mode,
                config=public_dump(cfg),  # secrets masked
                resume="allow" if resume else None,
                id=run_dir.name.replace(".", "-"),
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.rows = [r for r in self.rows if r["step"] != step] + [row]
        append_row(self.path, row)
        if self.wandb is not None:
            self.wandb.log(row, step=step)
            table = trajectory_table(self.run_dir, step) if any(k.startswith("val/") for k in row) else None
            if table is not None:
                self.wandb.log({"trajectories": table}, step=step)

    def close(self) -> None:
        if self.cfg.logging.report:
            write_report(self.rows, self.run_dir / "report.html", title=self.cfg.trainer.name)
        if self.wandb is not None:
            self.wandb.finish()


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row with a single write, flushed to disk; on failure the file is cut back to where it was and
    `RunFileWriteError` names the row, its size and the OS error (`run_files.append_bytes`)."""
    append_bytes(path, (json.dumps(row) + "\n").encode(), f"appending the row of step {row['step']}")


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file of the run (metrics.jsonl, ledger.jsonl). A line cut in half (the run was
    killed or the disk filled mid-write, or it is being written now) is skipped with a warning."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            log.warning("%s: line %d is cut off or corrupt, skipped: %.80r", path, number, line)
    return rows


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The last row of each step (a resumed run may repeat a step it had logged before stopping); a line cut
    in half is skipped (`read_json_lines`)."""
    if not path.exists():
        return []
    by_step = {row["step"]: row for row in read_json_lines(path)}
    return [by_step[s] for s in sorted(by_step)]


def resume_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """The rows up to `step` (the checkpoint a resumed run continues from), one per step; metrics.jsonl is
    rewritten to hold exactly these, since the steps after it are trained, and logged, again."""
    rows = read_metrics(path)
    kept = [r for r in rows if r["step"] <= step]
    if len(kept) < len(rows):
        log.warning(
            "%s: dropped the rows of steps %d-%d, after the resumed step %d",
            path,
            rows[len(kept)]["step"],
            rows[-1]["step"],
            step,
        )
    text = "".join(json.dumps(r) + "\n" for r in kept)
    replace_file(path, lambda tmp: tmp.write_text(text), f"rewriting {len(kept)} rows for the resume")
    return kept


def step_line(step: int, total: int, m: dict[str, Any]) -> str:
    """The one-line summary printed after each step; the sync part names the policy version the replicas now
    serve (`sync v3 0.61s`), so a user sees that each weight update landed."""

    def f(key: str, fmt: str = ".3f") -> str:
        v = m.get(key)
        return "-" if v is None else format(v, fmt)

    version = "" if m.get("sync/version") is None else f" v{m['sync/version']}"
    # Staleness in a few characters: the largest lag of a trained token, the share of tokens that lagged, and
    # the share of rollouts dropped as too stale.
    lag, dropped = m.get("staleness/max"), m.get("staleness/dropped_share")
    behind = 1.0 - m.get("staleness/tokens_behind_0", 0.0)  # the histogram has no empty buckets
    said = ([f"lag<={lag} {behind:.0%}"] if lag else []) + ([f"drop {dropped:.0%}"] if dropped else [])
    stale = " | " + " ".join(said) if said else ""
    loss = "sft/loss" if "sft/loss" in m else "learner/loss"
    return (
        f"step {step}/{total} | reward {f('rollout/reward_mean')} | ok {f('rollout/success_rate', '.0%')} "
        f"| val {f('val/success_rate', '.0%')} | loss {f(loss, '.4f')} | kl {f('learner/kl', '.4f')} "
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
