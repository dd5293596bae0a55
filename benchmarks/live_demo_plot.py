"""The live demo's plot (`benchmarks/live_demo.py`): held-out success and the user's right answers over time,
with a line per canary decision. Redraw a result: `python -m benchmarks.live_demo_plot RESULT.json`."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    held = result["held_out"]
    ax.plot(
        [p["time_s"] / 60 for p in held],
        [p["success"] for p in held],
        marker="o",
        lw=2,
        label=f"held-out success (first {held[0]['n']} val questions, greedy)",
    )
    user = result["user"]["curve"]
    ax.plot(
        [p["time_s"] / 60 for p in user],
        [p["right"] for p in user],
        alpha=0.6,
        label="user's questions answered right (sampled, per 2 min)",
    )
    ax.plot([], [], color="C2", lw=1, label="canary promoted")
    ax.plot([], [], color="C3", lw=1, label="canary rolled back")
    t0 = result["started_unix"]
    for row in result["run"]["canary"]:
        ax.axvline(
            (datetime.fromisoformat(row["time"]).timestamp() - t0) / 60,
            color="C2" if row["decision"] == "promote" else "C3",
            alpha=0.3,
            lw=1,
        )
    ax.set_xlabel("minutes (held-out: since its first check; user: since it started, just after)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"serve --learn, {result['model']}: {result['run']['steps_done']} steps")
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


if __name__ == "__main__":
    result_path = Path(sys.argv[1])
    plot(json.loads(result_path.read_text()), result_path.with_suffix(".png"))
