"""What a request's sampling settings become in vLLM: `SamplingParams`, and the JSON constraint of `json_schema`."""

from __future__ import annotations

import json
from typing import Any

from lightning_ray.config import SamplingConfig

# The configurable settings (`SamplingConfig`, named as vLLM names them) and what only a request sets;
# `json_schema`: the answer must be JSON of this schema (vLLM structured outputs), e.g. for tool_choice "required"
SAMPLING_KEYS = (*SamplingConfig.model_fields, "stop", "seed", "json_schema")
# Whitespace characters a constrained JSON answer may hold in a row: room for `": "` or a newline and an indent,
# but no room for a degenerate policy (a random model, a collapsed one) to spend max_tokens on whitespace, which the
# plain JSON grammar allows without bound (vLLM bounds it only through a structural tag).
JSON_MAX_WHITESPACE = 4


def sampling_params(sampling: dict[str, Any], stream: bool):
    """vLLM `SamplingParams` of a request: one sample with its log-probs, deltas when streamed."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    unknown = set(sampling) - set(SAMPLING_KEYS)
    if unknown:
        raise ValueError(f"unknown sampling keys: {sorted(unknown)}")
    params = {k: v for k, v in sampling.items() if v is not None}
    if "json_schema" in params:
        params["structured_outputs"] = json_constraint(params.pop("json_schema"))
    return SamplingParams(
        **params,
        n=1,
        logprobs=0,
        detokenize=bool(params.get("stop")),
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    )


def json_constraint(schema: dict[str, Any]):
    """vLLM structured outputs for JSON of `schema`, whitespace runs bounded by `JSON_MAX_WHITESPACE`."""
    from vllm.sampling_params import StructuredOutputsParams

    json_format = {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": JSON_MAX_WHITESPACE}
    tag = {"type": "structural_tag", "format": json_format}
    return StructuredOutputsParams(structural_tag=json.dumps(tag))
