"""`auto` precision (`model.dtype`, `learner.precision`): bfloat16 where the hardware computes it natively, float32
elsewhere.

Resolved where the model runs, inside each inference replica and learner rank, never on the driver: a CPU head
node must not choose for GPU workers. A CPU without native bfloat16 (AVX2 only: no AVX512 or AMX) makes torch and
vLLM emulate it: on a 2-core AMD EPYC with AVX2, SmolLM2-135M's forward and backward pass took 25x longer in
bfloat16 than in float32 (`benchmarks/results/precision_auto.json`), and the quickstart's rollouts and learner
steps ran 14x and 25x slower than on a box with native bfloat16.
"""

from __future__ import annotations

from typing import Literal

Precision = Literal["auto", "float32", "bfloat16"]


def native_bfloat16() -> bool:
    """Whether this process computes bfloat16 natively: a CUDA GPU that supports it, or a CPU oneDNN runs bfloat16
    on (AVX512 or AMX): oneDNN's check, the one torch's CPU kernels use."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str) -> str:
    """`auto` -> `bfloat16` on native hardware, `float32` elsewhere; any other value as it is."""
    if precision != "auto":
        return precision
    return "bfloat16" if native_bfloat16() else "float32"
