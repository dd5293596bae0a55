"""Keep vLLM's known-good warnings out of the user's terminal.

An in-place weight reload (vLLM's layerwise reload) warns `<layer>: Failed to load weights` for each layer
that got none of its tensors from the update, and puts that layer's old tensors back. Two layers get none on
every sync and need none:
- `ParallelLMHead` of a model with tied embeddings (SmolLM2): an HF state dict names the tied weight once,
  as the embedding, so the head is skipped; the weight receiver then re-ties and re-packs it.
- `RotaryEmbedding`: its only tensor is the cos/sin cache computed from the config (a non-persistent buffer
  that no checkpoint holds).
Those two warnings are dropped; any other layer's failure still shows.
"""

from __future__ import annotations

import logging

# Where vLLM (vllm/model_executor/model_loader/reload/layerwise.py) logs it, and its exact wording.
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
FAILED_TO_LOAD = "%s: Failed to load weights"
EXPECTED_LAYERS = frozenset({"ParallelLMHead", "RotaryEmbedding"})


class _ExpectedLayersFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == FAILED_TO_LOAD and record.args and record.args[0] in EXPECTED_LAYERS)


def silence_known_vllm_warnings() -> None:
    """Install the filter on vLLM's reload logger in this process; idempotent.

    Call it in the vLLM worker process, where the worker extension runs and the reload logs: vLLM spawns its
    engine and worker processes, so a filter installed in the Serve replica does not reach them.
    """
    logger = logging.getLogger(RELOAD_LOGGER)
    if not any(isinstance(f, _ExpectedLayersFilter) for f in logger.filters):
        logger.addFilter(_ExpectedLayersFilter())
