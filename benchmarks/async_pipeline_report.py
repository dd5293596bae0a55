"""What one mode of `benchmarks.async_pipeline` measured: per-step rows and the window's throughput from the
run's metrics and the step lines' timestamps, the waits its agent drew, and the table printed at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil

from benchmarks.slow_tool_agent import summarize_waits
from lightning_ray.monitor.run_log import read_metrics

BUSY = ("inference", "agents", "learner", "sync")
TIMES = ("rollout_s", "learner_s", "broadcast_s", "step_s")


def window_of(steps: int) -> tuple[int, int]:
    """The measured steps: 2..N-1 (step 1 warms up and fills the pipeline, step N saves the checkpoint)."""
    return (2, steps - 1) if steps >= 4 else (min(2, steps), steps)


def machine_cpu() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine since boot, summed over its cores: between two step lines,
    busy / all is how full the box was, whoever used it (the lock keeps other heavy jobs off it)."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    return sum(t) - idle, sum(t)


def trained_rollouts(row: dict[str, Any]) -> tuple[int | None, str]:
    if row.get("ledger/trained") is not None:
        return int(row["ledger/trained"]), "ledger/trained"
    if row.get("rollout/rollouts") is None:
        return None, "n/a"
    failed = sum(v for k, v in row.items() if k.startswith("rollout/failures/") and v)
    return int(row["rollout/rollouts"] - failed), "rollout/rollouts - rollout/failures/*"


def weighted(rows: list[dict[str, Any]], key: str, weights: list[float]) -> float | None:
    pairs = [(r[key], w) for r, w in zip(rows, weights, strict=True) if r.get(key) is not None]
    if not pairs or sum(w for _, w in pairs) <= 0:
        return None
    return round(sum(v * w for v, w in pairs) / sum(w for _, w in pairs), 3)


def measure(
    run_dir: Path, step_at: dict[int, float], steps: int, cpu_at: dict[int, tuple[float, float]] | None = None
) -> dict[str, Any]:
    """Per-step rows and the window's throughput from the run's metrics.jsonl and the step-line timestamps
    (and `machine_cpu()` at each step line, when given)."""
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] >= 1]
    per_step = []
    for r in rows:
        s = r["step"]
        trained, source = trained_rollouts(r)
        line_wall = step_at[s] - step_at[s - 1] if s in step_at and s - 1 in step_at else None
        per_step.append(
            {
                "step": s,
                "wall_s": round(line_wall, 3) if line_wall is not None else None,
                **{k: _round(r.get(f"time/{k}")) for k in TIMES},
                "trained_rollouts": trained,
                "trained_source": source,
                "rollouts": r.get("rollout/rollouts"),
                "groups_cut": r.get("rollout/groups_cut"),
                "sequences": r.get("learner/sequences"),
                "tokens_computed": r.get("learner/tokens_computed"),
                "reward_mean": _round(r.get("rollout/reward_mean")),
                **{f"{p}_busy_frac": _round(r.get(f"time/{p}_busy_frac")) for p in BUSY},
                **{k: _round(v) for k, v in r.items() if k.startswith(("staleness/", "ledger/"))},
                "prompt_tokens_computed": r.get("inference/prompt_tokens_computed"),
                "prefix_cache_hit_frac": _round(r.get("inference/prefix_cache_hit_frac")),
            }
        )
    out: dict[str, Any] = {"steps_logged": len(rows), "steps": per_step}
    if 1 in step_at and rows and rows[0]["step"] == 1 and rows[0].get("time/step_s") is not None:
        out["startup_s"] = round(step_at[1] - rows[0]["time/step_s"], 2)  # launch to the start of step 1
    first, last = window_of(steps)
    win = [p for p in per_step if first <= p["step"] <= last]
    if len(win) != last - first + 1 or first - 1 not in step_at or last not in step_at:
        out["error"] = f"steps {first}..{last} not all logged (the run stopped early?)"
        return out
    wall = step_at[last] - step_at[first - 1]
    trained = [p["trained_rollouts"] for p in win]
    samples = sum(trained) if None not in trained else None
    weights = [p["wall_s"] or 0.0 for p in win]
    ledger: dict[str, float] = {}
    for p in win:
        for k, v in p.items():
            if k.startswith("ledger/") and v is not None:
                ledger[k] = ledger.get(k, 0) + v
    out["window"] = {
        "steps": f"{first}..{last}",
        "n_steps": len(win),
        "wall_s": round(wall, 2),
        "sum_time_step_s": _round(sum(p["step_s"] or 0.0 for p in win)),
        "trained_rollouts": samples,
        "trained_source": win[0]["trained_source"],
        "samples_per_s": round(samples / wall, 4) if samples is not None and wall > 0 else None,
        "s_per_step": round(wall / len(win), 2),
        # Replies grow or shrink as each run's policy drifts its own way: tokens trained per second is the
        # throughput with the work per sample taken out.
        "learner_tokens_per_s": _round(sum(p["tokens_computed"] or 0 for p in win) / wall, 2),
        **{f"mean_{k}": _mean([p[k] for p in win]) for k in TIMES},
        **{f"{p}_busy_frac": weighted(win, f"{p}_busy_frac", weights) for p in BUSY},
        "staleness_mean": weighted(win, "staleness/mean", weights),
        "staleness_max": max(
            (p["staleness/max"] for p in win if p.get("staleness/max") is not None), default=None
        ),
        "ledger": ledger,
        # what the engines computed of the prompts: a weight update empties their prefix caches
        "prompt_tokens_computed_per_step": _mean([p["prompt_tokens_computed"] for p in win]),
        "prefix_cache_hit_frac": _mean([p["prefix_cache_hit_frac"] for p in win]),
    }
    if cpu_at and first - 1 in cpu_at and last in cpu_at:
        busy, total = (b - a for a, b in zip(cpu_at[first - 1], cpu_at[last], strict=True))
        # How full the machine was, and the CPU one trained sample cost: a mode that keeps the box full can go
        # no faster than its core-seconds per sample allow.
        out["window"]["machine_cpu_busy_frac"] = round(busy / total, 3) if total > 0 else None
        out["window"]["core_s_per_sample"] = round(busy / samples, 3) if samples else None
    return out


def read_waits(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"rollouts": 0}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    waits = [w for line in lines for w in line["waits"]]
    return {
        "rollouts": len(lines),
        "waits_per_rollout": round(len(waits) / len(lines), 2) if lines else None,
        "tool_calls_per_rollout": _mean([line["tool_calls"] for line in lines]),
        "wait_s_per_rollout": round(sum(waits) / len(lines), 3) if lines else None,
        "waits": summarize_waits(waits),
    }


def _round(v: Any, nd: int = 4) -> Any:
    return round(v, nd) if isinstance(v, float) else v


def _mean(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 3) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def phase_estimates(modes: dict[str, dict[str, Any]], base_name: str) -> dict[str, float | None]:
    """What each mode with K >= 1 can gain over the synchronous `base_name` if its groups take as long as the
    base's: base step / max(R / K, L + B), with R the base's wait for a batch's groups per step, L and B the
    mode's learner and sync seconds per step (benchmarks/README.md, "Why K = 1 stays under 1.8x here"). An
    estimate, not a bound: replies of other lengths, or spare groups, give K >= 1 another R."""
    base = modes[base_name].get("window")
    out: dict[str, float | None] = {}
    for name, m in modes.items():
        k, w = int(name.removeprefix("K=")), m.get("window")
        if name == base_name or k == 0:
            continue
        if not (base and w):
            out[f"{name}/{base_name}"] = None
            continue
        step = max(base["mean_rollout_s"] / k, w["mean_learner_s"] + w["mean_broadcast_s"])
        out[f"{name}/{base_name}"] = ratio(base["s_per_step"], step)
    return out


def fmt(v: Any, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def table(modes: dict[str, dict[str, Any]], base: float | None) -> str:
    head = (
        f"{'mode':<5} {'steps':>6} {'s/step':>7} {'samples/s':>9} {'x K=0':>6} {'tok/s':>6} {'rollout':>8} "
        f"{'learner':>8} "
        f"{'sync':>6} {'infer busy':>10} {'agents busy':>11} {'learner busy':>12} {'stale':>9} "
        f"{'start-up':>8} {'cpu busy':>8} {'core-s/sample':>13}"
    )
    lines = [head, "-" * len(head)]
    for name, m in modes.items():
        w = m.get("window")
        if not w:
            lines.append(f"{name:<5} failed: {m.get('error', '?')}")
            continue
        stale = f"{fmt(w['staleness_mean'])}/{fmt(w['staleness_max'], 'd')}"
        if w["staleness_mean"] is None and w["staleness_max"] is None:
            stale = "n/a"
        lines.append(
            f"{name:<5} {w['steps']:>6} {fmt(w['s_per_step'], '.1f'):>7} {fmt(w['samples_per_s'], '.3f'):>9} "
            f"{fmt(ratio(w['samples_per_s'], base)):>6} {fmt(w['learner_tokens_per_s'], '.1f'):>6} "
            f"{fmt(w['mean_rollout_s'], '.1f'):>8} "
            f"{fmt(w['mean_learner_s'], '.1f'):>8} {fmt(w['mean_broadcast_s'], '.2f'):>6} "
            f"{fmt(w['inference_busy_frac']):>10} {fmt(w['agents_busy_frac']):>11} "
            f"{fmt(w['learner_busy_frac']):>12} {stale:>9} {fmt(m.get('startup_s'), '.0f'):>8} "
            f"{fmt(w.get('machine_cpu_busy_frac')):>8} {fmt(w.get('core_s_per_sample')):>13}"
        )
    return "\n".join(lines)


def print_summary(
    modes: dict[str, dict[str, Any]], base: float | None, result: dict[str, Any], estimates: dict[str, Any]
) -> None:
    """The table, the waits each mode's agent drew, the ratios and the target, as the run ends."""
    print(f"\n{table(modes, base)}")
    for n, m in modes.items():
        w = m.get("tool_waits", {})
        print(
            f"{n}: {w.get('rollouts', 0)} rollouts started, {fmt(w.get('waits_per_rollout'))} waits and "
            f"{fmt(w.get('wait_s_per_rollout'))} s waited per rollout, drawn {w.get('waits', {})}"
            + (f"  WARNING: {m['warning']}" if m.get("warning") else "")
        )
    print(", ".join(f"samples/s {k}: {fmt(v, '.3f')}" for k, v in result["ratios_samples_per_s"].items()))
    print(
        ", ".join(
            f"learner tokens/s {k}: {fmt(v, '.3f')}" for k, v in result["ratios_learner_tokens_per_s"].items()
        )
    )
    if estimates:
        shown = ", ".join(f"{k}: {fmt(v, '.3f')}" for k, v in estimates.items())
        print(f"expected from the phases (K >= 1 waiting as long for its groups as K = 0): {shown}")
    target = result["target"]
    print(f"target {target['ratio']} >= {target['min']}: {target['met']}")
