"""vLLM's expected reload warnings are dropped, every other one still reaches the terminal."""

from __future__ import annotations

import logging

from lightning_ray.inference.quiet import FAILED_TO_LOAD, RELOAD_LOGGER, silence_known_vllm_warnings


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
