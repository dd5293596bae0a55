"""Learner checkpoints: an HF model folder that vLLM and transformers load as is, plus the DeepSpeed engine
state (`deepspeed/`: partitioned optimizer and master weights) to resume exactly.

The marker file is written last, so a folder without it is an incomplete checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lightning_ray.config import LearnerConfig
from lightning_ray.learner.export import gather_hf_state_dict

CHECKPOINT_MARKER = "lightning_ray_checkpoint.json"
ENGINE_DIR = "deepspeed"
ENGINE_TAG = "engine"
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json")


def save_checkpoint(
    engine: Any,
    path: str | Path,
    *,
    model_path: str,
    cfg: LearnerConfig,
    rank: int,
    world_size: int,
    optimizer_steps: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the HF folder (rank 0) and every rank's engine state under `path`. Collective."""
    import torch.distributed as dist

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = gather_hf_state_dict(engine.module, cfg.zero_stage, rank)
    if rank == 0:
        (out / CHECKPOINT_MARKER).unlink(missing_ok=True)
        _write_hf_folder(out, state, model_path, cfg.precision)
    client = {"optimizer_steps": optimizer_steps}
    engine.save_checkpoint(str(out / ENGINE_DIR), tag=ENGINE_TAG, client_state=client, save_latest=False)
    dist.barrier()
    if rank == 0:
        marker = {"world_size": world_size, "zero_stage": cfg.zero_stage, **client, "extra": extra}
        (out / CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=2))


def _write_hf_folder(out: Path, state: dict[str, torch.Tensor], model_path: str, precision: str) -> None:
    """The weights plus every non-weight file of the source model folder (tokenizer, chat template, ...)."""
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoConfig

    src = Path(model_path)
    for f in src.iterdir():
        if (
            f.is_file()
            and not f.name.endswith(WEIGHT_FILES)
            and f.name not in ("config.json", CHECKPOINT_MARKER)
        ):
            shutil.copy2(f, out / f.name)
    config = AutoConfig.from_pretrained(src)
    config.dtype = "bfloat16" if precision == "bfloat16" else "float32"
    config.save_pretrained(out)
    save_torch_state_dict(state, out, metadata={"format": "pt"})


def load_checkpoint(
    engine: Any, path: str | Path, cfg: LearnerConfig, world_size: int
) -> tuple[dict[str, Any], int]:
    """Restore weights and optimizer from `save_checkpoint`'s folder. Collective.
    Returns the marker (with the caller's `extra`) and the optimizer step count to resume from."""
    marker_path = Path(path) / CHECKPOINT_MARKER
    if not marker_path.is_file():
        raise FileNotFoundError(f"{path} is not a complete learner checkpoint (no {CHECKPOINT_MARKER})")
    marker = json.loads(marker_path.read_text())
    if marker["zero_stage"] != cfg.zero_stage or (cfg.zero_stage > 0 and marker["world_size"] != world_size):
        raise ValueError(
            f"{path} was saved with zero_stage={marker['zero_stage']} on {marker['world_size']} learners; "
            f"resume with the same learner.zero_stage and learner.num_workers "
            f"(now {cfg.zero_stage} and {world_size})"
        )
    load_path, client = engine.load_checkpoint(
        str(Path(path) / ENGINE_DIR),
        tag=ENGINE_TAG,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the engine state under {path}/{ENGINE_DIR}")
    optimizer_steps = int((client or {}).get("optimizer_steps", marker.get("optimizer_steps", 0)))
    return marker, optimizer_steps
