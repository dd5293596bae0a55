"""What `auto` precision saves on this CPU: bfloat16 against float32, on a matmul and on SmolLM2-135M's forward and
backward pass (the learner's work), in one process with the learner's 2 torch threads.

    flock /tmp/lr-heavy.lock python -m benchmarks.precision_auto [--tokens 256] [--out results/precision_auto_x.json]

Prints and writes benchmarks/results/precision_auto.json (or `--out`): the CPU's model name and vector extensions, what `auto`
resolves to here (`lightning_ray.precision`), seconds per pass in each dtype (median of 3 after a warm-up) and
`bf16_over_fp32`, with the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lightning_ray.models import resolve_model
from lightning_ray.precision import native_bfloat16, resolve_precision

RESULT = Path(__file__).parent / "results" / "precision_auto.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def median_s(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_info() -> dict[str, object]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = lines.get("flags\t\t", "").split()
    return {
        "model": lines.get("model name\t", "").strip(),
        "extensions": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="sequence length of the model pass")
    parser.add_argument("--out", type=Path, default=RESULT, help="result JSON")
    args = parser.parse_args()
    torch.set_num_threads(2)
    load_before = os.getloadavg()[0]
    path = resolve_model("builtin:smollm2-135m-instruct")
    ids = torch.randint(0, 49152, (1, args.tokens))
    out: dict[str, object] = {"benchmark": "precision_auto", "date": time.strftime("%Y-%m-%d %H:%M")}
    out.update(cpu=cpu_info(), native_bfloat16=native_bfloat16(), auto=resolve_precision("auto"))
    out["command"] = f"python -m benchmarks.precision_auto --tokens {args.tokens} --out {args.out}"
    for name, dtype in DTYPES.items():
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)

        def step(model=model) -> None:
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()

        out[name] = {"matmul_1024_s": median_s(lambda a=a, b=b: a @ b), "forward_backward_s": median_s(step)}
        print(name, out[name], flush=True)
    fp32, bf16 = out["float32"], out["bfloat16"]
    out["bf16_over_fp32"] = {k: round(bf16[k] / fp32[k], 1) for k in fp32}
    out["load_avg_1m"] = {"before": load_before, "after": os.getloadavg()[0]}
    print(json.dumps(out, indent=1))
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
