"""Samples/s of GRPO on an agent with slow, long-tailed I/O: synchronous (K = 0) vs `max_staleness` 1 and 2.

    flock /tmp/lr-heavy.lock python -m benchmarks.async_pipeline            # SmolLM2, K = 0, 1, 2 (~15 min)
    flock /tmp/lr-heavy.lock python -m benchmarks.async_pipeline --smoke    # tiny random model, 2 steps each
    python -m benchmarks.async_pipeline --dry-run                            # print the commands, run nothing

Run from the repository root. Each mode is one `lightning-ray train configs/quickstart.yaml ...` in a
subprocess of its own (its own local Ray cluster, started and shut down by that process), one after the
other, with the overrides in `overrides()`: the agent `benchmarks.slow_tool_agent:slow_calc_agent` (the
calc agent, whose environment step after every model reply sleeps a lognormal time: median 1 s, sigma 1.0,
p99 ~10 s), no validation, a checkpoint only after the last step, wandb and the report off,
`algorithm.drop_zero_variance` off (every group trains in every mode, so every step trains the same number
of rollouts) and `algorithm.old_logprobs=decoupled` in every mode (required for K >= 1; at K = 0 it costs
the same as `recompute` and keeps the loss identical across modes). Only `trainer.max_staleness` differs
(and, for K >= 1, `trainer.over_provision` / `stale_groups`; `inference.on_update` when given); the
quickstart's `auto` thread counts follow from it (K = 0: the engine and the learner each get every core in
turn; K >= 1: they share them), and the result records each mode's.

What is measured, per mode, over the window of steps 2..N-1 (step 1 carries warm-up and fills the pipeline;
step N saves the final checkpoint; with N < 4, steps 2..N):

* wall time: this script timestamps the `step k/N` line the run prints after each step; the window's wall time
  is the time from step 1's line to step N-1's. Start-up (Ray, vLLM, workers, learner) is before step 1 and
  is reported apart. The sum of the run's own `time/step_s` over the window is kept beside it as a check.
* samples/s: rollouts trained in the window (`ledger/trained` per step when the loop logs it, else
  `rollout/rollouts` less failures) / the window's wall time; seconds per step = wall time / steps.
* learner tokens/s: the tokens the learner computed in the window (`learner/tokens_computed`) / its wall time.
  Each run's policy drifts its own way and its replies grow or shrink with it, so samples/s also moves with
  the work per sample; tokens/s takes that out. Both ratios to K = 0 are printed and kept.
* busy fractions of inference, agents, learner and sync (`time/{inference,agents,learner,sync}_busy_frac`,
  weighted by step time) when the loop logs them, "n/a" otherwise; mean `time/{rollout,learner,broadcast}_s`;
  staleness (`staleness/mean`, `staleness/max`) and the `ledger/*` counts (dropped, failed) over the window.
* how full the machine was (`machine_cpu_busy_frac`: busy / all CPU time of the whole box between the window's
  step lines) and the CPU a trained sample cost (`core_s_per_sample`): a mode that fills the box can go no
  faster than 1 / its core-seconds per sample times the cores.
* the waits the agent actually drew (from `LR_BENCH_TOOL_LOG`), over every rollout the run started.

The result (`benchmarks/results/async_pipeline.json`, `async_pipeline_smoke.json` with `--smoke`) holds the
per-mode numbers and steps, samples/s ratios K=1/K=0 and K=2/K=0 against the target (K = 1 >= 1.8x), the
1-minute load average before and after each mode and the whole run, and the exact commands.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.async_pipeline_report import (
    machine_cpu,
    measure,
    phase_estimates,
    print_summary,
    ratio,
    read_waits,
    window_of,
)
from benchmarks.slow_tool_agent import ToolLatency, summarize_waits
from lightning_ray.config import ConfigError, load_config
from lightning_ray.rollouts.stream import spare_groups

CONFIG = "configs/quickstart.yaml"
AGENT = "benchmarks.slow_tool_agent:slow_calc_agent"
RESULTS = Path(__file__).parent / "results"
TARGET = {"ratio": "K=1/K=0", "min": 1.8}
STEP_LINE = re.compile(r"(?:^|\r)step (\d+)/(\d+) \|")  # after a progress bar's \r on the same line
SMOKE_MODEL_DIR = Path(tempfile.gettempdir()) / "lr-async-bench-tiny-model"


# ------------------------------------------------------------------------------------------ configuration


def smoke_overrides() -> list[str]:
    """The tiny random model (2 layers, SmolLM2's tokenizer) on half-CPU actors, as the tests run it."""
    from lightning_ray.models import make_tiny_model

    model = make_tiny_model(SMOKE_MODEL_DIR)
    return [
        f"model.path={model}",
        "model.dtype=float32",
        "inference.max_model_len=1024",
        "inference.kv_cache_gib=1",
        "inference.num_cpus_per_replica=0.5",
        "learner.num_cpus_per_worker=0.5",
        "learner.precision=float32",
    ]


def overrides(args: argparse.Namespace, k: int, run_root: Path) -> list[str]:
    out = [
        f"rollout.agent={AGENT}",
        f"rollout.concurrency={args.concurrency}",
        f"trainer.name=k{k}",
        f"trainer.run_dir={run_root}",
        f"trainer.steps={args.steps}",
        f"trainer.tasks_per_step={args.tasks}",
        "trainer.val_every=0",
        "trainer.checkpoint_every=0",
        f"trainer.seed={args.seed}",
        f"trainer.max_staleness={k}",
        f"algorithm.group_size={args.group}",
        "algorithm.drop_zero_variance=false",
        f"algorithm.old_logprobs={args.old_logprobs if k else args.k0_old_logprobs}",
        f"inference.sampling.max_tokens={args.max_tokens}",
        "logging.wandb=false",
        "logging.report=false",
    ]
    if k:
        out += [f"trainer.over_provision={args.over_provision}", f"trainer.stale_groups={args.stale_groups}"]
    if args.on_update:
        out.append(f"inference.on_update={args.on_update}")
    return out + list(args.override)


def check_configs(
    args: argparse.Namespace, ks: list[int], run_root: Path, extra: list[str]
) -> dict[str, dict[str, int]]:
    """Every mode's config must load before the first run starts (a typo fails here, not after K = 0); each
    mode's compute threads as the run will settle them."""
    threads = {}
    for k in ks:
        cfg = load_config(args.config, [*extra, *overrides(args, k, run_root)], check_files=True)
        threads[f"K={k}"] = {
            "inference.engine_threads": cfg.inference.engine_threads,
            "learner.torch_threads": cfg.learner.torch_threads,
        }
    return threads


def latency_of(args: argparse.Namespace) -> ToolLatency:
    return ToolLatency(median_s=args.tool_median, sigma=args.tool_sigma, max_s=args.tool_max, seed=args.seed)


# ------------------------------------------------------------------------------------------ one mode


def run_mode(args: argparse.Namespace, k: int, run_root: Path, extra: list[str]) -> dict[str, Any]:
    """`lightning-ray train` with max_staleness k in a subprocess; its output is echoed and its step lines
    timestamped."""
    mode_dir = run_root / f"k{k}"
    mode_dir.mkdir(parents=True, exist_ok=True)
    waits_log = mode_dir / "tool_waits.jsonl"
    waits_log.unlink(missing_ok=True)
    env_vars = {**latency_of(args).env(), "LR_BENCH_TOOL_LOG": str(waits_log.resolve())}
    cmd = [
        sys.executable,
        "-m",
        "lightning_ray.cli",
        "train",
        args.config,
        *extra,
        *overrides(args, k, run_root),
    ]
    shown = " ".join(
        [*(f"{k}={shlex.quote(v)}" for k, v in env_vars.items()), "lightning-ray", *map(shlex.quote, cmd[3:])]
    )
    print(f"\n== K={k}: {shown}", flush=True)
    result: dict[str, Any] = {"max_staleness": k, "command": shown}
    load_before = os.getloadavg()[0]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **env_vars)
    step_at: dict[int, float] = {}
    cpu_at: dict[int, tuple[float, float]] = {}
    t_launch = time.monotonic()
    timed_out = False
    with (mode_dir / "train.log").open("w") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
            start_new_session=True,
        )  # fmt: skip

        def pump() -> None:
            """Echo the run's output, keep it in train.log and timestamp its step lines."""
            for line in proc.stdout:
                now = time.monotonic()
                sys.stdout.write(line)
                log.write(line)
                if m := STEP_LINE.search(line):
                    step_at[int(m.group(1))] = now - t_launch
                    cpu_at[int(m.group(1))] = machine_cpu()

        # A reader thread, so that a process the run left holding the pipe cannot keep this script waiting.
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=args.mode_timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = stop(proc)
        except KeyboardInterrupt:
            stop(proc)
            raise
        reader.join(timeout=30)
    result["returncode"] = rc
    result["timed_out"] = timed_out
    result["process_wall_s"] = round(time.monotonic() - t_launch, 2)
    result["loadavg_1m_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    result["log"] = str(mode_dir / "train.log")
    run_dirs = sorted((run_root / f"k{k}").glob("train-*"))
    if not run_dirs:
        result["error"] = f"no run directory under {run_root / f'k{k}'} (exit code {rc})"
        return result
    result["run_dir"] = str(run_dirs[-1])
    result.update(measure(run_dirs[-1], step_at, args.steps, cpu_at))
    waits = read_waits(waits_log)
    result["tool_waits"] = waits
    if not waits.get("rollouts"):
        result["warning"] = (
            f"no tool waits in {waits_log}: the LR_BENCH_TOOL_* settings may not have reached the workers"
        )
    if rc != 0:
        result["error"] = f"exit code {rc}" + (" (timed out)" if timed_out else "")
    return result


def stop(proc: subprocess.Popen) -> int:
    """Stop the run this script started: Ctrl-C first (the loop shuts its actors down), then its process
    group (the child was started in a session of its own, so the group is the child and what it spawned)."""
    try:
        proc.send_signal(signal.SIGINT)
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()
    except ProcessLookupError:
        return proc.wait()


def git_state() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (
        " (uncommitted changes)" if git("status", "--porcelain") else ""
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny random model, 2 steps per mode, short waits"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the settings and commands, run nothing")
    parser.add_argument("--modes", default="0,1,2", help="max_staleness values, the first is the baseline")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--steps", type=int, help="GRPO steps per mode (6; smoke 2)")
    parser.add_argument("--tasks", type=int, help="trainer.tasks_per_step (3; smoke 2)")
    parser.add_argument("--group", type=int, help="algorithm.group_size (8; smoke 4)")
    parser.add_argument("--max-tokens", type=int, help="inference.sampling.max_tokens (64; smoke 16)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent rollouts per rollout worker")
    parser.add_argument("--tool-median", type=float, help="median wait in s (1.0; smoke 0.05)")
    parser.add_argument("--tool-sigma", type=float, help="sigma of log(wait) (1.0; smoke 0.5)")
    parser.add_argument("--tool-max", type=float, help="cap on one wait in s (60; smoke 1)")
    parser.add_argument("--seed", type=int, default=0, help="trainer.seed and the waits' seed")
    parser.add_argument("--old-logprobs", default="decoupled", help="algorithm.old_logprobs for K >= 1")
    parser.add_argument(
        "--k0-old-logprobs", default="decoupled", help="algorithm.old_logprobs for K = 0 (or recompute)"
    )
    parser.add_argument(
        "--over-provision",
        type=float,
        default=0.0,
        help="trainer.over_provision for K >= 1 (spare groups: this times --tasks, rounded up)",
    )
    parser.add_argument("--stale-groups", default="drop", help="trainer.stale_groups for K >= 1")
    parser.add_argument("--on-update", choices=["finish", "interrupt"], help="inference.on_update (config's)")
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="one more override, every mode"
    )
    parser.add_argument(
        "--mode-timeout", type=float, help="seconds before a mode is stopped (1800; smoke 600)"
    )
    parser.add_argument("--run-root", type=Path, help="where the runs go (runs/async_pipeline/<time>)")
    parser.add_argument("--out", type=Path, help="result JSON (results/async_pipeline[_smoke].json)")
    args = parser.parse_args(argv)

    full = {"steps": 6, "tasks": 3, "group": 8, "max_tokens": 64, "tool_median": 1.0, "tool_sigma": 1.0,
            "tool_max": 60.0, "mode_timeout": 1800.0}  # fmt: skip
    smoke = {"steps": 2, "tasks": 2, "group": 4, "max_tokens": 16, "tool_median": 0.05, "tool_sigma": 0.5,
             "tool_max": 1.0, "mode_timeout": 600.0}  # fmt: skip
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    name = "async_pipeline_smoke" if args.smoke else "async_pipeline"
    args.out = args.out or RESULTS / f"{name}.json"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_root = args.run_root or Path("runs") / name / stamp
    ks = [int(k) for k in args.modes.split(",")]
    latency = latency_of(args)

    print(
        f"tool latency: lognormal median {latency.median_s} s, sigma {latency.sigma}, cap {latency.max_s} s"
    )
    print(f"  configured quantiles: {latency.describe()}")
    rng = latency.rng("quantile-check")
    print(f"  10000 draws:          {summarize_waits([latency.draw(rng) for _ in range(10_000)])}")
    first, last = window_of(args.steps)
    print(
        f"{args.steps} steps x {args.tasks} tasks x {args.group} samples per mode; modes K={ks}; "
        f"measured over steps {first}..{last}; runs under {run_root}"
    )
    extra = smoke_overrides() if args.smoke and not args.dry_run else []
    try:
        threads = check_configs(args, ks, run_root, extra)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for k in ks:
            ov = (["<smoke model overrides>"] if args.smoke else []) + overrides(args, k, run_root)
            print(
                f"K={k} ({threads[f'K={k}']}): lightning-ray train {args.config} {' '.join(map(shlex.quote, ov))}"
            )
        return 0

    load_before = os.getloadavg()
    t0 = time.monotonic()
    modes: dict[str, dict[str, Any]] = {}
    for k in ks:
        modes[f"K={k}"] = run_mode(args, k, run_root, extra)
    base_name = f"K={ks[0]}"
    base = modes[base_name].get("window", {}).get("samples_per_s")
    samples = {n: m.get("window", {}).get("samples_per_s") for n, m in modes.items()}
    ratios = {f"{n}/{base_name}": ratio(s, base) for n, s in samples.items() if n != base_name}
    tokens = {n: m.get("window", {}).get("learner_tokens_per_s") for n, m in modes.items()}
    token_ratios = {
        f"{n}/{base_name}": ratio(t, tokens[base_name]) for n, t in tokens.items() if n != base_name
    }
    target_ratio = ratios.get(TARGET["ratio"])
    estimates = phase_estimates(modes, base_name) if args.over_provision == 0 else {}
    result = {
        "benchmark": "async_pipeline",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "code": git_state(),
        "machine": f"{os.cpu_count()} CPU cores",
        "smoke": args.smoke,
        "model": "tiny random Llama (make_tiny_model)" if args.smoke else "builtin:smollm2-135m-instruct",
        "config": args.config,
        "agent": AGENT,
        "tool_latency": {
            "distribution": "lognormal, asyncio.sleep after every model reply (no CPU)",
            "median_s": latency.median_s,
            "sigma": latency.sigma,
            "max_s": latency.max_s,
            "seed": latency.seed,
            "configured": latency.describe(),
        },
        "settings": {
            "steps": args.steps,
            "tasks_per_step": args.tasks,
            "group_size": args.group,
            "rollouts_per_step": args.tasks * args.group,
            "max_tokens": args.max_tokens,
            "rollout_concurrency": args.concurrency,
            "old_logprobs": {"K=0": args.k0_old_logprobs, "K>=1": args.old_logprobs},
            "over_provision": args.over_provision,
            "spare_groups": spare_groups(args.over_provision, args.tasks),
            "stale_groups": args.stale_groups,
            "on_update": args.on_update or "(config default)",
            "extra_overrides": args.override,
            "threads": threads,
        },
        "measured": (
            f"steps {first}..{last}: wall time between the step lines of steps {first - 1} and {last}; "
            "samples = trained rollouts in those steps"
        ),
        "samples_per_s": samples,
        "ratios_samples_per_s": ratios,
        "learner_tokens_per_s": tokens,
        "ratios_learner_tokens_per_s": token_ratios,
        "phase_estimate_samples_per_s": estimates or "n/a: spare groups shorten what K >= 1 waits for",
        "target": {
            **TARGET,
            "value": target_ratio,
            "met": None if target_ratio is None else target_ratio >= TARGET["min"],
        },
        "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "total_wall_s": round(time.monotonic() - t0, 1),
        "commands": {
            "benchmark": " ".join(["python -m benchmarks.async_pipeline", *map(shlex.quote, sys.argv[1:])]),
            **{n: m["command"] for n, m in modes.items()},
        },
        "modes": modes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print_summary(modes, base, result, estimates)
    print(f"load average (1 min) before/after: {result['loadavg_1m_before_after']}; wrote {args.out}")
    return 0 if all("error" not in m for m in modes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
