"""The run page's curves: Plotly figures built from the rows of metrics.jsonl (one row per step).

Each chart is a list of metric keys; a key no row has yet is left out, so the same charts serve a run that has
only logged its first step, a synchronous run (no busy/idle split, no staleness) and a finished one.
"""

from __future__ import annotations

import json
from typing import Any

import pandas  # noqa: F401  plotly imports it lazily; two request threads doing that at once see half a module
import plotly.graph_objects as go
from plotly.subplots import make_subplots

# chart id -> (title, [(metric key, label)])
LINES = {
    "reward": (
        "Reward and success",
        [
            ("rollout/reward_mean", "train reward (mean)"),
            ("rollout/success_rate", "train rollouts without failure"),
            ("val/reward_mean", "held-out reward (greedy)"),
            ("val/success_rate", "held-out success (greedy)"),
        ],
    ),
    "busy": (
        "Busy fraction per part (the rest: idle, waiting)",
        [
            ("time/inference_busy_frac", "inference"),
            ("time/agents_busy_frac", "agents"),
            ("time/learner_busy_frac", "learner"),
            ("time/sync_busy_frac", "weight sync"),
        ],
    ),
    "staleness": (
        "Staleness of trained tokens (policy versions behind)",
        [
            ("staleness/mean", "mean lag"),
            ("staleness/max", "max lag"),
            ("staleness/tokens_behind_0", "share on-policy"),
        ],
    ),
}
STEP_PARTS = [
    ("time/rollout_s", "rollouts"),
    ("time/learner_s", "learner"),
    ("time/broadcast_s", "weight sync"),
]
LEARNER = [
    ("learner/loss", "loss"),
    ("sft/loss", "SFT loss (NLL)"),
    ("learner/kl", "KL"),
    ("learner/clip_frac", "clip fraction"),
    ("learner/entropy", "entropy"),
    ("learner/grad_norm", "grad norm"),
]
FAILURE_PREFIX = "rollout/failures/"


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _layout(fig: go.Figure, title: str, **kw: Any) -> go.Figure:
    fig.update_layout(
        title=title,
        height=300,
        margin={"l": 50, "r": 20, "t": 50, "b": 40},
        legend={"orientation": "h", "y": -0.2},
        template="plotly_white",
        **kw,
    )
    fig.update_xaxes(title_text="step", tick0=0, dtick=max(1, -(-_last_step(fig) // 10)))
    return fig


def _last_step(fig: go.Figure) -> int:
    return int(max((max(t.x) for t in fig.data if t.x is not None and len(t.x)), default=1))


def line_chart(rows: list[dict[str, Any]], title: str, keys: list[tuple[str, str]]) -> go.Figure:
    fig = go.Figure()
    for key, label in keys:
        xs, ys = _series(rows, key)
        if xs:
            fig.add_trace(go.Scatter(x=xs, y=ys, name=label, mode="lines+markers"))
    return _layout(fig, title)


def step_time_chart(rows: list[dict[str, Any]]) -> go.Figure:
    """Seconds per step, stacked by part."""
    fig = go.Figure()
    for key, label in STEP_PARTS:
        xs, ys = _series(rows, key)
        if xs:
            fig.add_trace(go.Bar(x=xs, y=ys, name=label))
    return _layout(fig, "Time per step by part (s)", barmode="stack")


def learner_chart(rows: list[dict[str, Any]]) -> go.Figure:
    """One small panel per learner metric (their scales differ by orders of magnitude)."""
    present = [(k, label) for k, label in LEARNER if _series(rows, k)[0]] or LEARNER[:1]
    fig = make_subplots(rows=1, cols=len(present), subplot_titles=[label for _, label in present])
    for col, (key, label) in enumerate(present, start=1):
        xs, ys = _series(rows, key)
        fig.add_trace(go.Scatter(x=xs, y=ys, name=label, mode="lines+markers"), row=1, col=col)
    return _layout(fig, "Learner", showlegend=False)


def failure_chart(rows: list[dict[str, Any]]) -> go.Figure:
    """Failed rollouts per step, stacked by kind."""
    kinds = sorted({k.removeprefix(FAILURE_PREFIX) for r in rows for k in r if k.startswith(FAILURE_PREFIX)})
    fig = go.Figure()
    for kind in kinds:
        xs, ys = _series(rows, FAILURE_PREFIX + kind)
        fig.add_trace(go.Bar(x=xs, y=ys, name=kind))
    return _layout(fig, "Failed rollouts by kind", barmode="stack")


def charts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every chart of the page as Plotly JSON (`Plotly.react(div, fig.data, fig.layout)` draws it)."""
    figures = {
        "reward": line_chart(rows, *LINES["reward"]),
        "step_time": step_time_chart(rows),
        "busy": line_chart(rows, *LINES["busy"]),
        "staleness": line_chart(rows, *LINES["staleness"]),
        "learner": learner_chart(rows),
        "failures": failure_chart(rows),
    }
    return {name: json.loads(fig.to_json()) for name, fig in figures.items()}
