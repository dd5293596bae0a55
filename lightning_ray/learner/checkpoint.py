"""Learner checkpoints: an HF model folder that vLLM and transformers load as is, plus the DeepSpeed engine
state (`deepspeed/`: partitioned optimizer and master weights) to resume exactly.

The marker file is written last, after every file is flushed to disk, and lists what the checkpoint holds:
each file's size, and a checksum of the small ones (configs, tokenizer, the stream's `groups.json`). A
checkpoint is complete only when its marker is there and every file matches it (`checkpoint_problem`), so
a folder cut off by a crash, truncated or corrupted later is never resumed from.

A failed write on any rank (disk full) must not leave the other ranks waiting in a collective: each rank
defers its error to the next point where all ranks compare notes, then all of them raise
`CheckpointWriteError` and rank 0 removes the half-written folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_ray.checkpoints import (
    CHECKPOINT_MARKER,
    ENGINE_DIR,
    CheckpointWriteError,
    describe_write_failure,
    manifest,
    read_marker,
)
from lightning_ray.config import LearnerConfig
from lightning_ray.safe_pickle import weights_only_load

if TYPE_CHECKING:  # torch is imported by the learner, not by the CLI's checks of a run directory
    import torch

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
    """Write the HF folder (rank 0) and every rank's engine state under `path`, then the marker. Collective.
    Files already in `path` (the driver's `stream/`) become part of the checkpoint."""
    from lightning_ray.learner.export import gather_hf_state_dict

    out = Path(path)
    state = gather_hf_state_dict(engine.module, cfg.zero_stage, rank)
    failure = None
    if rank == 0:
        failure = _attempt(out, lambda note: _write_hf_folder(out, state, model_path, cfg.precision, note))
    _raise_if_any_failed(out, rank, failure)
    client = {"optimizer_steps": optimizer_steps}
    with _deferred_engine_errors(engine, out) as failures:
        engine.save_checkpoint(str(out / ENGINE_DIR), tag=ENGINE_TAG, client_state=client, save_latest=False)
    _raise_if_any_failed(out, rank, failures[0] if failures else None)
    if rank == 0:
        marker = {"world_size": world_size, "zero_stage": cfg.zero_stage, **client, "extra": extra}
        failure = _attempt(out, lambda note: _write_marker(out, marker, note))
        if failure is not None:
            shutil.rmtree(out, ignore_errors=True)
            raise CheckpointWriteError(out, f"rank 0: {failure}")


# ---------------------------------------------------------------------------------------- writing


def _write_hf_folder(
    out: Path, state: dict[str, torch.Tensor], model_path: str, precision: str, note: Callable[[Path], None]
) -> None:
    """The weights plus every non-weight file of the source model folder (tokenizer, chat template, ...).
    `note(file)` is told which file is written next, so that an error can name it."""
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoConfig

    out.mkdir(parents=True, exist_ok=True)
    (out / CHECKPOINT_MARKER).unlink(missing_ok=True)  # rewriting a folder: incomplete until the new marker
    src = Path(model_path)
    for f in src.iterdir():
        if (
            f.is_file()
            and not f.name.endswith(WEIGHT_FILES)
            and f.name not in ("config.json", CHECKPOINT_MARKER)
        ):
            note(out / f.name)
            shutil.copy2(f, out / f.name)
    config = AutoConfig.from_pretrained(src)
    config.dtype = "bfloat16" if precision == "bfloat16" else "float32"
    note(out / "config.json")
    config.save_pretrained(out)
    note(out / "model.safetensors")
    save_torch_state_dict(state, out, metadata={"format": "pt"})


def _write_marker(out: Path, marker: dict[str, Any], note: Callable[[Path], None]) -> None:
    """Flush every file to disk, then write the marker listing them (flushed too): complete only now."""
    files = manifest(out)
    for name in files:
        note(out / name)
        _fsync(out / name)
    note(out / CHECKPOINT_MARKER)
    tmp = out / f".{CHECKPOINT_MARKER}.tmp"
    with tmp.open("w") as f:
        json.dump({**marker, "files": files}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(out / CHECKPOINT_MARKER)
    for folder in {out, *((out / name).parent for name in files)}:
        _fsync(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _attempt(out: Path, write: Callable[[Callable[[Path], None]], None]) -> str | None:
    """Run `write(note)`; None when it worked, else what failed (the file, how much of it was written,
    the free space, the error), for `CheckpointWriteError`."""
    current: list[Path] = []
    try:
        write(current.append)
    except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks, not hang them
        return describe_write_failure(out, current[-1] if current else None, e)
    return None


@contextmanager
def _deferred_engine_errors(engine: Any, out: Path) -> Iterator[list[str]]:
    """While DeepSpeed saves, record the first failed write (and skip the rest) instead of raising, so this
    rank still reaches DeepSpeed's barriers and the check after them. Yields the failures."""
    failures: list[str] = []
    writer = engine.checkpoint_engine

    def deferred(name: str, write: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if failures:
                return None
            try:
                return write(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - see the docstring
                target = kwargs.get("path", args[-1] if args else None)
                failures.append(describe_write_failure(out, Path(str(target)) if target else None, e))
                return None

        guarded.__name__ = name
        return guarded

    patched = [
        (writer, "save", writer.save),
        (writer, "makedirs", writer.makedirs),
        (engine, "_copy_recovery_script", engine._copy_recovery_script),  # rank 0 copies zero_to_fp32.py
    ]
    for owner, name, method in patched:
        setattr(owner, name, deferred(name, method))
    try:
        yield failures
    finally:
        for owner, name, _ in patched:
            delattr(owner, name)  # back to the class's method


def _raise_if_any_failed(out: Path, rank: int, failure: str | None) -> None:
    """Collective: every rank learns whether any rank failed; then rank 0 removes the folder and all raise
    the same error."""
    import torch.distributed as dist

    failures: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    named = [f"rank {r}: {f}" for r, f in enumerate(failures) if f is not None]
    if named:
        if rank == 0:
            shutil.rmtree(out, ignore_errors=True)
        dist.barrier()  # removed before any rank raises: a caller may stop every rank at the first error
        raise CheckpointWriteError(out, "; ".join(named))


def load_checkpoint(
    engine: Any, path: str | Path, cfg: LearnerConfig, world_size: int
) -> tuple[dict[str, Any], int]:
    """Restore weights and optimizer from `save_checkpoint`'s folder, unpickling weights and plain data only
    (`lightning_ray.safe_pickle`). Collective. Returns the marker (with the caller's `extra`) and the optimizer step count to resume from."""
    marker = read_marker(path)
    if marker["zero_stage"] != cfg.zero_stage or (cfg.zero_stage > 0 and marker["world_size"] != world_size):
        raise ValueError(
            f"{path} was saved with zero_stage={marker['zero_stage']} on {marker['world_size']} learners; "
            f"resume with the same learner.zero_stage and learner.num_workers "
            f"(now {cfg.zero_stage} and {world_size})"
        )
    writer = engine.checkpoint_engine
    writer.load = weights_only_load  # DeepSpeed's own load unpickles anything (weights_only=False)
    try:
        load_path, client = engine.load_checkpoint(
            str(Path(path) / ENGINE_DIR),
            tag=ENGINE_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
    finally:
        del writer.load  # back to the class's method
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the engine state under {path}/{ENGINE_DIR}")
    optimizer_steps = int((client or {}).get("optimizer_steps", marker.get("optimizer_steps", 0)))
    return marker, optimizer_steps
