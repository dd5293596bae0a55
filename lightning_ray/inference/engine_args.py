"""A replica's vLLM engine settings, in one place: the Serve replica builds its engine from them, and a benchmark
that starts vLLM's own OpenAI server as a peer passes the same ones as command-line flags."""

from __future__ import annotations

from typing import Any

from lightning_ray.config import InferenceConfig, ModelConfig
from lightning_ray.precision import resolve_precision


def engine_settings(model: ModelConfig, inference: InferenceConfig) -> dict[str, Any]:
    """vLLM `EngineArgs` fields for a replica of `inference` serving `model` (those left to vLLM are absent)."""
    settings = {
        "dtype": resolve_precision(
            model.dtype
        ),  # `auto`: the hardware of the process that calls this decides
        "max_model_len": inference.max_model_len,
        "max_num_seqs": inference.max_num_seqs,
        "enforce_eager": inference.enforce_eager,
        "seed": inference.seed,
        "tensor_parallel_size": inference.tensor_parallel_size,
        "gpu_memory_utilization": inference.gpu_memory_utilization,
        "enable_prefix_caching": True,
        "scheduling_policy": "priority" if inference.scheduling == "oldest_group" else None,
        "block_size": inference.engine_block_size(),
        **whole_prompt_steps(inference),
    }
    return {k: v for k, v in settings.items() if v is not None}


def whole_prompt_steps(icfg: InferenceConfig) -> dict[str, Any]:
    """A CPU engine never splits a prompt across engine steps (no chunked prefill). For the token a partial
    prefill samples and throws away, vLLM (0.32) rewinds a seeded request's generator by an offset only CUDA
    generators have: a CPU one raises "CPU Generator does not use offset" and the engine dies, for any agent that
    sends a `seed` while prompts queue up. A step's token budget then holds the longest prompt at least, and
    never less than vLLM's CPU default (4096)."""
    if icfg.num_gpus_per_replica:
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(icfg.max_model_len, 4096)}


def as_cli_flags(settings: dict[str, Any]) -> list[str]:
    """The same settings as `vllm serve` flags (a boolean field is `--name` or `--no-name`)."""
    flags: list[str] = []
    for key, value in settings.items():
        name = key.replace("_", "-")
        flags += (
            [f"--{name}" if value else f"--no-{name}"]
            if isinstance(value, bool)
            else [f"--{name}", str(value)]
        )
    return flags
