"""Which checkpoints of a run keep their optimizer state (`trainer.keep_checkpoints`).

A checkpoint is an HF model folder (what vLLM and transformers load) plus the DeepSpeed engine state that
an exact resume needs: optimizer moments and, in bf16, fp32 master weights. For SmolLM2-135M trained in
bf16 that is 0.27 GB of weights and 1.88 GB of engine state. Only the newest checkpoint is needed to resume,
so the newest `keep` complete ones stay whole and older ones are pruned to their HF folder: still a model to
evaluate or serve, no longer one to resume from (their marker goes with the engine state, so `--resume`
never picks them).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lightning_ray.learner.checkpoint import CHECKPOINT_MARKER, ENGINE_DIR


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders whose marker is written, oldest first (the marker is written last, so a folder
    still being written, or cut off by a crash, has none)."""
    return sorted(p.parent for p in (run_dir / "checkpoints").glob(f"step-*/{CHECKPOINT_MARKER}"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, the one `--resume` continues from."""
    return (complete_checkpoints(run_dir) or [None])[-1]


def prune_checkpoints(run_dir: Path, keep: int | None) -> list[Path]:
    """Prune every complete checkpoint older than the newest `keep` (>= 1) to its HF folder; `None` keeps
    all whole. Folders without a marker are never touched. Returns the pruned folders."""
    if keep is None:
        return []
    if keep < 1:
        raise ValueError(f"keep={keep}: the newest checkpoint always stays whole")
    pruned = complete_checkpoints(run_dir)[:-keep]
    for path in pruned:
        # Engine state first: cut off in between, the folder still has its marker and is pruned next time.
        shutil.rmtree(path / ENGINE_DIR, ignore_errors=True)
        (path / CHECKPOINT_MARKER).unlink()
    return pruned
