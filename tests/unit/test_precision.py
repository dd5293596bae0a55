"""`auto` precision follows the hardware: on a CPU, bfloat16 only with bfloat16 instructions (AVX512-BF16 or AMX)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_ray.config import load_config
from lightning_ray.precision import native_bfloat16, resolve_precision


@pytest.mark.skipif(
    torch.cuda.is_available() or not Path("/proc/cpuinfo").exists(), reason="a Linux CPU test"
)
def test_auto_is_bfloat16_exactly_on_cpus_with_bfloat16_instructions():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    native = "avx512_bf16" in flags or "amx_bf16" in flags  # AVX512 alone: oneDNN emulates bfloat16
    assert native_bfloat16() == native
    assert resolve_precision("auto") == ("bfloat16" if native else "float32")


def test_explicit_precisions_stay_and_auto_is_the_model_default():
    assert [resolve_precision(p) for p in ("float32", "bfloat16")] == ["float32", "bfloat16"]
    cfg = load_config(None, [], check_files=False)
    assert (cfg.model.dtype, cfg.learner.precision) == ("auto", "float32")
    assert load_config(None, ["learner.precision=auto"], check_files=False).learner.precision == "auto"
