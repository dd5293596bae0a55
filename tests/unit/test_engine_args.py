"""A replica's vLLM engine settings, and the same settings as flags for vLLM's own server."""

from __future__ import annotations

import pytest

from lightning_ray.config import load_config
from lightning_ray.inference.engine_args import as_cli_flags, engine_settings


@pytest.mark.parametrize(
    "overrides", [[], ["inference.num_gpus_per_replica=1", "inference.enforce_eager=false"]]
)
def test_flags_parse_back_to_the_same_engine_arguments(overrides):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cfg = load_config(None, overrides, check_files=False)
    settings = engine_settings(cfg.model, cfg.inference)
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    parsed = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m", *as_cli_flags(settings)]))
    assert {k: getattr(parsed, k) for k in settings} == settings
