"""Moving a ~100 MB trajectory table between Ray actors: Arrow table vs the same rows as pickled Python objects.

    python benchmarks/arrow_vs_pickle.py [--mb 100] [--runs 5]

A producer actor holds the batch both ways: a `pyarrow.Table` with the project's TRANSITION_SCHEMA, and the
same rows as a list of dicts (token ids and log-probs as Python lists), which is what a framework that ships
trajectories as plain objects moves around. One timed round trip, driven from the driver:

    producer: ray.put(batch) -> ref           (Arrow: buffers copied into the object store; pickle: pickled)
    consumer (another actor): ray.get(ref)     (Arrow: zero-copy view; pickle: unpickled into Python objects)
                              touch the data   (sum of response lengths, then all response ids as one array)

Rows are realistic: prompts of 200-1500 tokens, responses of 20-600 tokens with float32 log-probs, multi-call
rollouts in groups. Reports the median over `--runs` round trips per format (one untimed warm-up each) with a
breakdown, and writes benchmarks/results/arrow_vs_pickle.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def make_rows(target_mb: float, seed: int = 0) -> list[dict]:
    import numpy as np

    from lightning_ray.data.schema import TRANSITION_SCHEMA

    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    size = 0
    rollout = 0
    while size < target_mb * 1e6:
        group, task = f"g-{rollout // 4:06d}", f"calc-train-{rollout // 4:04d}"
        prefix = rng.integers(0, 49152, int(rng.integers(200, 800)), dtype=np.int32)
        for call in range(int(rng.integers(1, 4))):
            n_prompt = len(prefix)
            n_resp = int(rng.integers(20, 600))
            resp = rng.integers(0, 49152, n_resp, dtype=np.int32)
            logprobs = -rng.exponential(0.7, n_resp).astype(np.float32)
            rows.append(
                {
                    "rollout_id": f"r-{rollout:08d}-{os.urandom(6).hex()}",
                    "task_id": task,
                    "group_id": group,
                    "attempt": 1,
                    "agent": "default",
                    "call_index": call,
                    "prompt_ids": prefix.tolist(),
                    "response_ids": resp.tolist(),
                    "response_logprobs": logprobs.tolist(),
                    "policy_version": 3,
                    "finish_reason": "stop",
                    "latency_s": float(rng.uniform(0.2, 4.0)),
                    "endpoint": "chat",
                    "model": "smollm2-135m-instruct",
                    "started_at": time.time(),
                    "response_text": "x" * (n_resp * 4),
                    "call_reward": None,
                    "reward": float(rng.integers(0, 2)),
                    "reward_dims": [("correct", 1.0)],
                    "status": "succeeded",
                }
            )
            size += 4 * (n_prompt + 2 * n_resp) + 4 * n_resp + 120
            # The next turn sends the whole conversation back: the prompt grows by the answer and a tool reply.
            prefix = np.concatenate([prefix, resp, rng.integers(0, 49152, 30, dtype=np.int32)])[:1500]
        rollout += 1
    assert set(rows[0]) == set(TRANSITION_SCHEMA.names)
    return rows


class Producer:
    def __init__(self, target_mb: float):
        import pyarrow as pa

        from lightning_ray.data.schema import TRANSITION_SCHEMA

        self.rows = make_rows(target_mb)
        self.table = pa.Table.from_pylist(self.rows, schema=TRANSITION_SCHEMA)

    def describe(self) -> dict:
        import pickle

        return {
            "rows": self.table.num_rows,
            "arrow_mb": round(self.table.nbytes / 1e6, 1),
            "pickle_mb": round(len(pickle.dumps(self.rows, protocol=5)) / 1e6, 1),
        }

    def put(self, fmt: str) -> tuple[list, float]:
        import ray

        t0 = time.perf_counter()
        ref = ray.put(self.table if fmt == "arrow" else self.rows)
        return [ref], time.perf_counter() - t0  # a list, so the ref reaches the consumer un-resolved


class Consumer:
    def take(self, refs: list) -> dict:
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc
        import ray

        t0 = time.perf_counter()
        data = ray.get(refs[0])
        t1 = time.perf_counter()
        if isinstance(data, pa.Table):
            total = pc.sum(pc.list_value_length(data["response_ids"])).as_py()
            t2 = time.perf_counter()
            flat = data["response_ids"].combine_chunks().flatten().to_numpy()
        else:
            total = sum(len(r["response_ids"]) for r in data)
            t2 = time.perf_counter()
            flat = np.fromiter((t for r in data for t in r["response_ids"]), dtype=np.int32, count=total)
        t3 = time.perf_counter()
        assert len(flat) == total
        del data
        return {"get_s": t1 - t0, "sum_lengths_s": t2 - t1, "to_array_s": t3 - t2, "response_tokens": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="size of the batch as Arrow buffers")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    import ray

    load_before = round(os.getloadavg()[0], 2)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        producer = ray.remote(Producer).options(num_cpus=0.5).remote(args.mb)
        consumer = ray.remote(Consumer).options(num_cpus=0.5).remote()
        size = ray.get(producer.describe.remote())
        times: dict[str, list[dict]] = {"arrow": [], "pickle": []}
        for i in range(args.runs + 1):
            for fmt in ("arrow", "pickle") if i % 2 == 0 else ("pickle", "arrow"):
                t0 = time.perf_counter()
                refs, put_s = ray.get(producer.put.remote(fmt))
                got = ray.get(consumer.take.remote(refs))
                total_s = time.perf_counter() - t0
                del refs
                if i > 0:  # run 0 warms both actors up
                    times[fmt].append({"total_s": total_s, "put_s": put_s, **got})
    finally:
        ray.shutdown()

    def med(fmt: str, key: str) -> float:
        return round(statistics.median(t[key] for t in times[fmt]), 4)

    keys = ("total_s", "put_s", "get_s", "sum_lengths_s", "to_array_s")
    result = {
        **size,
        "runs": args.runs,
        "arrow": {k: med("arrow", k) for k in keys},
        "pickle": {k: med("pickle", k) for k in keys},
        "ratio_total_pickle_over_arrow": round(med("pickle", "total_s") / med("arrow", "total_s"), 1),
        "ratio_touch_pickle_over_arrow": round(  # touch = consumer get + sum of lengths
            (med("pickle", "get_s") + med("pickle", "sum_lengths_s"))
            / (med("arrow", "get_s") + med("arrow", "sum_lengths_s")),
            1,
        ),
        "response_tokens": times["arrow"][0]["response_tokens"],
        "note": "total_s = driver-timed round trip: producer put + consumer get + both touches + actor calls",
        "machine": f"{os.cpu_count()} CPU cores",
        "load_avg_1m_before_after": [load_before, round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "arrow_vs_pickle.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
