"""`auto` precision (`model.dtype`, `learner.precision`): bfloat16 where the hardware computes it natively, float32
elsewhere.

Resolved where the model runs, inside each inference replica and learner rank, never on the driver: a CPU head
node must not choose for GPU workers. A CPU without bfloat16 instructions (AVX512-BF16 or AMX) makes torch and
vLLM emulate it: on a 2-core AMD EPYC with AVX2, SmolLM2-135M's forward and backward pass took 25x longer in
bfloat16 than in float32 (`benchmarks/results/precision_auto.json`), and the quickstart's rollouts and learner
steps ran 14x and 25x slower than on a box with native bfloat16. AVX512 alone is not enough: oneDNN accepts
bfloat16 there, but converts it: on a 2-core Intel Xeon with AVX512 and no AVX512-BF16 the same pass took 3.5x
longer in bfloat16 (`benchmarks/results/precision_auto_avx512.json`).
"""

from __future__ import annotations

from typing import Literal

Precision = Literal["auto", "float32", "bfloat16"]


def native_bfloat16() -> bool:
    """Whether this process computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with bfloat16 dot
    products (AVX512-BF16, or AMX tiles). Not oneDNN's own `_is_mkldnn_bf16_supported`: it says yes on any
    AVX512 core, where bfloat16 is emulated and slower than float32."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str) -> str:
    """`auto` -> `bfloat16` on native hardware, `float32` elsewhere; any other value as it is."""
    if precision != "auto":
        return precision
    return "bfloat16" if native_bfloat16() else "float32"
