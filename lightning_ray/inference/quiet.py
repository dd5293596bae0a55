"""Keep vLLM's known-good warnings out of the user's terminal.

An in-place weight reload (vLLM's layerwise reload) warns `<layer>: Failed to load weights` for each layer
that got none of its tensors from the update, and puts that layer's old tensors back. Two layers get none on
every sync and need none:
- `ParallelLMHead` of a model with tied embeddings (SmolLM2): an HF state dict names the tied weight once,
  as the embedding, so the head is skipped; the weight receiver then re-ties and re-packs it.
- `RotaryEmbedding`: its only tensor is the cos/sin cache computed from the config (a non-persistent buffer
  that no checkpoint holds).
Those two warnings are dropped; any other layer's failure still shows.

Loading a checkpoint stored in float32 into an engine serving bfloat16 or float16 (`model.dtype`, which `auto`
makes bfloat16 on hardware with native bf16) warns `Attempted to load weight ... with dtype torch.float32 into
parameter with dtype torch.bfloat16` once per tensor at start-up: 122 lines for SmolLM2, for the cast the config
asked for. That narrowing is dropped; any other dtype mismatch still shows.

A CPU engine runs every prompt whole (`engine_args.whole_prompt_steps`, which keeps seeded requests from killing it),
and vLLM warns that the model "does not officially support disabling chunked prefill" and may crash or produce
incorrect outputs. vLLM's own CPU platform turns chunked prefill off for MLA models, and the tests check the
engine's ids and log-probs with it off (streamed against whole and across weight updates exactly, against the
learner's within 1e-3); that warning is dropped.
"""

from __future__ import annotations

import logging

# Where vLLM (vllm/model_executor/model_loader/reload/layerwise.py) logs it, and its exact wording.
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
FAILED_TO_LOAD = "%s: Failed to load weights"
EXPECTED_LAYERS = frozenset({"ParallelLMHead", "RotaryEmbedding"})
# Where vLLM's weight loader (vllm/model_executor/models/utils.py) logs a dtype mismatch, and its wording.
LOADER_LOGGER = "vllm.model_executor.models.utils"
DTYPE_MISMATCH = "Attempted to load weight %s with dtype %s into parameter with dtype %s"
SERVED_NARROWER = frozenset({"torch.bfloat16", "torch.float16"})
# Where vLLM's engine arguments (vllm/engine/arg_utils.py) warn that chunked prefill is off, and the wording.
ARGS_LOGGER = "vllm.engine.arg_utils"
CHUNKED_PREFILL_OFF = (
    "This model does not officially support disabling chunked prefill. "
    "Disabling this manually may cause the engine to crash or produce incorrect outputs."
)


class _ExpectedLayersFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == FAILED_TO_LOAD and record.args and record.args[0] in EXPECTED_LAYERS)


class _Float32CheckpointFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (
            record.msg == DTYPE_MISMATCH
            and len(args) == 3
            and str(args[1]) == "torch.float32"
            and str(args[2]) in SERVED_NARROWER
        )


class _ChunkedPrefillOffFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != CHUNKED_PREFILL_OFF


def silence_known_vllm_warnings() -> None:
    """Install the filters on vLLM's reload, loader and engine-argument loggers in this process; idempotent.

    Call it in the vLLM process that loads the model (the engine core, or its worker process), before the load:
    vLLM spawns its engine and worker processes, so a filter installed in the Serve replica does not reach them.
    The engine arguments are checked in the replica itself, which imports the weight receiver (and so calls
    this) before it builds the engine.
    """
    for name, kind in (
        (RELOAD_LOGGER, _ExpectedLayersFilter),
        (LOADER_LOGGER, _Float32CheckpointFilter),
        (ARGS_LOGGER, _ChunkedPrefillOffFilter),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
