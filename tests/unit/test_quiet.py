"""vLLM's known-good warnings are dropped, every other one still reaches the terminal."""

from __future__ import annotations

import inspect
import logging

import torch

from lightning_ray.inference.quiet import (
    ARGS_LOGGER,
    CHUNKED_PREFILL_OFF,
    DTYPE_MISMATCH,
    FAILED_TO_LOAD,
    LOADER_LOGGER,
    RELOAD_LOGGER,
    silence_known_vllm_warnings,
)


def test_only_the_expected_layers_are_silenced(caplog):
    logger = logging.getLogger(RELOAD_LOGGER)
    silence_known_vllm_warnings()
    silence_known_vllm_warnings()  # idempotent: one filter
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=RELOAD_LOGGER):
        for layer in ("ParallelLMHead", "RotaryEmbedding", "QKVParallelLinear"):
            logger.warning(FAILED_TO_LOAD, layer)
        logger.warning("%s: something else", "ParallelLMHead")
    assert [r.getMessage() for r in caplog.records] == [
        "QKVParallelLinear: Failed to load weights",
        "ParallelLMHead: something else",
    ]


def test_only_a_float32_checkpoint_served_in_half_precision_is_silenced(caplog):
    logger = logging.getLogger(LOADER_LOGGER)
    silence_known_vllm_warnings()
    silence_known_vllm_warnings()
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=LOADER_LOGGER):
        logger.warning(DTYPE_MISMATCH, "embed_tokens.weight", torch.float32, torch.bfloat16)
        logger.warning(DTYPE_MISMATCH, "lm_head.weight", torch.float32, torch.float16)
        logger.warning(DTYPE_MISMATCH, "layers.0.mlp.up_proj.weight", torch.float16, torch.bfloat16)
        logger.warning(DTYPE_MISMATCH, "layers.0.mlp.up_proj.weight", torch.float32, torch.int8)
    assert [r.getMessage() for r in caplog.records] == [
        "Attempted to load weight layers.0.mlp.up_proj.weight with dtype torch.float16 into parameter with "
        "dtype torch.bfloat16",
        "Attempted to load weight layers.0.mlp.up_proj.weight with dtype torch.float32 into parameter with "
        "dtype torch.int8",
    ]


def test_only_the_chunked_prefill_off_warning_of_the_engine_arguments_is_silenced(caplog):
    import vllm.engine.arg_utils

    # the wording of the vLLM installed (a new one that words it otherwise shows it again)
    assert CHUNKED_PREFILL_OFF.split(". ")[0] in inspect.getsource(vllm.engine.arg_utils)
    logger = logging.getLogger(ARGS_LOGGER)
    silence_known_vllm_warnings()
    silence_known_vllm_warnings()
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=ARGS_LOGGER):
        logger.warning(CHUNKED_PREFILL_OFF)
        logger.warning("Some other engine argument warning.")
    assert [r.getMessage() for r in caplog.records] == ["Some other engine argument warning."]
