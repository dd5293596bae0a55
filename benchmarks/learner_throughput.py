"""Seconds per learner step and tokens per second on the quickstart's batches: prefix-shared packing vs padding.

    flock /tmp/lr-heavy.lock python -m benchmarks.learner_throughput [--repeats 2] [--precision bfloat16]
        [--threads 1] [--out benchmarks/results/learner_throughput_1thread.json]

Run from the repository root. The batches are three real quickstart steps (`benchmarks/data/quickstart_steps
.parquet`: the trajectories of steps 2, 10 and 18 of a `configs/quickstart.yaml` run on SmolLM2-135M, 3 GRPO
groups of 8 each), prepared as the loop prepares them (`training_rows`: merged turns, then group advantages).
Each mode starts one DeepSpeed learner rank as the quickstart configures it (ZeRO 0, 2 torch threads, the
config's precision, `old_logprobs: recompute`, one optimizer step per batch) on SmolLM2-135M and trains
those batches `--repeats` times over, one after the other:

* `padded`: `learner.packing: false`, rows left-padded to the longest, 8 rows a micro-batch (the quickstart's
  setting before packing);
* `packed_dense`: `learner.packing: true`, each micro-batch one prefix-shared sequence (`learner.packing`),
  attention by SDPA with the dense N x N trie mask (`learner.attention: sdpa`, the CPU path before `tree`);
* `packed`: the same micro-batches with the attention the config resolves (`auto`: `tree` on a CPU, each
  chain against its ancestors only; FlexAttention on a GPU).

The first step of each mode is warm-up and not counted. Per mode: median seconds per step, token positions
computed per step (`tokens_computed`: padding and repeated prompts included for `padded`), response tokens
that carry loss, and both per second. `speedup = padded step_s / packed step_s` (target >= 2.5), and the
same ratio of `packed_dense` to `packed`: what computing the trie's pairs only saves. Writes
benchmarks/results/learner_throughput.json with the 1-minute load average before and after each mode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from lightning_ray.algorithms.advantages import compute_advantages
from lightning_ray.config import load_config
from lightning_ray.learner.engine import attention_implementation
from lightning_ray.learner.group import LearnerGroup
from lightning_ray.loop import training_rows
from lightning_ray.models import resolve_model

DATA = Path(__file__).parent / "data" / "quickstart_steps.parquet"
RESULT = Path(__file__).parent / "results" / "learner_throughput.json"
TARGET = 2.5
PADDED_MICRO_BATCH = 8


def quickstart_batches(cfg) -> list[pa.Table]:
    """The shipped steps, each as the loop hands it to the learner (one row per training sequence)."""
    table = pq.read_table(DATA)
    steps = sorted(set(table.column("step").to_pylist()))
    out = []
    for s in steps:
        transitions = table.filter(pa.compute.equal(table.column("step"), s)).drop_columns(["step"])
        rows, _ = compute_advantages(training_rows(transitions, cfg), cfg.algorithm)
        out.append(rows)
    return out


MODES = {  # learner settings per mode; padded: 8 rows a micro-batch, as the quickstart ran before packing
    "padded": {"packing": False, "attention": "auto", "micro_batch_size": PADDED_MICRO_BATCH},
    "packed_dense": {"packing": True, "attention": "sdpa"},
    "packed": {"packing": True},
}


def run_mode(cfg, batches: list[pa.Table], name: str, repeats: int) -> dict:
    learner = cfg.learner.model_copy(update=MODES[name])
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    group = LearnerGroup(learner, resolve_model(cfg.model.path), seed=cfg.trainer.seed)
    startup_s = time.perf_counter() - t0
    steps = []
    try:
        for batch in batches * repeats:
            t = time.perf_counter()
            m = group.train_step(batch, cfg.algorithm)
            steps.append({"wall_s": time.perf_counter() - t, **{k: m[k] for k in METRICS if k in m}})
            print(
                f"  {name}: {steps[-1]['wall_s']:.2f}s "
                f"{m['tokens_computed']:.0f} computed / {m['tokens']:.0f} loss tokens, loss {m['loss']:.4f}",
                flush=True,
            )
    finally:
        group.shutdown()
    measured = steps[1:]
    step_s = statistics.median(s["wall_s"] for s in measured)
    runs = [steps[i :: len(batches)][1 if i == 0 else 0 :] for i in range(len(batches))]  # warm-up left out
    by_batch = [round(statistics.median(s["wall_s"] for s in r), 3) if r else None for r in runs]
    computed = statistics.mean(s["tokens_computed"] for s in measured)
    loss_tokens = statistics.mean(s["tokens"] for s in measured)
    return {
        "packing": learner.packing,
        "attention": attention_implementation(learner),
        "startup_s": round(startup_s, 2),
        "step_s": round(step_s, 3),
        "step_s_by_batch": by_batch,  # median per shipped batch
        "tokens_computed_per_step": round(computed, 1),
        "loss_tokens_per_step": round(loss_tokens, 1),
        "tokens_computed_per_s": round(computed / step_s, 1),
        "loss_tokens_per_s": round(loss_tokens / step_s, 1),
        "micro_batches": statistics.mean(s["micro_batches"] for s in measured),
        "load_avg_1m": {"before": load_before, "after": os.getloadavg()[0]},
        "steps": steps,
    }


METRICS = (
    "tokens_computed",
    "tokens",
    "micro_batches",
    "loss",
    "time_s",
    "time_old_logprobs_s",
    "old_logprob_pass",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the shipped batches per mode")
    parser.add_argument("--precision", choices=["float32", "bfloat16"], help="default: the config's")
    parser.add_argument("--threads", type=int, help="learner.torch_threads (default: the config's)")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES)
    )
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    overrides = [f"learner.precision={args.precision}"] if args.precision else []
    cfg = load_config(
        args.config, overrides + ([f"learner.torch_threads={args.threads}"] if args.threads else [])
    )
    batches = quickstart_batches(cfg)
    rows = [b.num_rows for b in batches]
    print(
        f"{len(batches)} quickstart batches ({rows} rows), learner {cfg.learner.precision}, x{args.repeats}"
    )
    ray.init(num_cpus=max(2.0, cfg.learner.num_cpus_per_worker), include_dashboard=False)
    try:
        modes = {name: run_mode(cfg, batches, name, args.repeats) for name in args.modes.split(",")}
    finally:
        ray.shutdown()

    def ratio(slow: str, fast: str, key: str = "step_s") -> float | None:
        return round(modes[slow][key] / modes[fast][key], 3) if slow in modes and fast in modes else None

    speedup = ratio("padded", "packed")
    result = {
        "benchmark": "learner_throughput",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python -m benchmarks.learner_throughput "
        + " ".join(f"{k}={v}" for k, v in vars(args).items()),
        "model": cfg.model.path,
        "precision": cfg.learner.precision,
        "torch_threads": cfg.learner.torch_threads,
        "max_tokens_per_micro_batch": cfg.learner.max_tokens_per_micro_batch,
        "micro_batch_size_padded": PADDED_MICRO_BATCH,
        "batch_rows": rows,
        "modes": modes,
        "speedup_packed_vs_padded": speedup,
        "speedup_packed_vs_packed_dense": ratio("packed_dense", "packed"),
        "computed_tokens_ratio": ratio("padded", "packed", "tokens_computed_per_step"),
        "target": {"speedup_min": TARGET, "met": speedup is not None and speedup >= TARGET},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, m in modes.items():
        print(
            f"{name}: {m['step_s']:.2f} s/step, {m['tokens_computed_per_step']:.0f} tokens computed "
            f"({m['tokens_computed_per_s']:.0f}/s), {m['loss_tokens_per_step']:.0f} loss tokens "
            f"({m['loss_tokens_per_s']:.0f}/s), load {m['load_avg_1m']}"
        )
    print(f"speedup packed vs padded: {speedup}x (target >= {TARGET}x) -> {args.out}")
    print(f"speedup packed vs packed_dense: {result['speedup_packed_vs_packed_dense']}x")


if __name__ == "__main__":
    main()
