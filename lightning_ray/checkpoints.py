"""The checkpoints of a run directory: which are complete, which keep their optimizer state
(`trainer.keep_checkpoints`), how the driver writes its part of one, and what `--resume` continues from.

A checkpoint is an HF model folder (what vLLM and transformers load) plus the DeepSpeed engine state that
an exact resume needs: optimizer moments and, in bf16, fp32 master weights. For SmolLM2-135M trained in
bf16 that is 0.27 GB of weights and 1.88 GB of engine state. Only the newest checkpoint is needed to resume,
so the newest `keep` complete ones stay whole and older folders are pruned to their HF folder: still a model
to evaluate or serve, no longer one to resume from (their marker goes with the engine state, so `--resume`
never picks them). Complete means verified against the marker's file list (`checkpoint_problem`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_ray.faults import RunFault

CHECKPOINT_MARKER = "lightning_ray_checkpoint.json"
ENGINE_DIR = "deepspeed"  # the DeepSpeed engine state, written by `lightning_ray.learner.checkpoint`
CHECKSUM_MAX_BYTES = 4 << 20  # files up to this size get a sha256 in the marker; larger ones only a size
FULL_BELOW_BYTES = (
    1 << 20
)  # a write failed with less free than this: the disk is full, whatever the error says
STREAM_DIR = "stream"  # the driver's part of a checkpoint (`RolloutStream.save`)
STREAM_GROUPS = Path(STREAM_DIR) / "groups.json"  # its complete, untrained groups
STREAM_PARTIAL = Path(STREAM_DIR) / "partials.json"  # the finished rollouts of its running groups
CONFIG_FILE = "config.yaml"  # the resolved config `new_run_dir` writes


class CheckpointWriteError(RunFault):
    """A checkpoint could not be written (disk full, ...). Its folder is removed; older checkpoints are not
    touched, so the last complete one still resumes."""

    def __init__(self, path: str | Path, detail: str):
        super().__init__(f"could not write checkpoint {path}: {detail}")
        self.path, self.detail = str(path), detail

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.path, self.detail)


class IncompleteCheckpoint(ValueError):
    """A folder that is not a complete checkpoint (no marker, or a file that does not match it)."""


def manifest(path: Path) -> dict[str, dict[str, Any]]:
    """Every file under `path` but the marker: its size, and a sha256 when it is small."""
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        name = f.relative_to(path).as_posix()
        if name in (CHECKPOINT_MARKER, f".{CHECKPOINT_MARKER}.tmp"):
            continue
        size = f.stat().st_size
        files[name] = {"size": size, **({"sha256": _sha256(f)} if size <= CHECKSUM_MAX_BYTES else {})}
    return files


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_marker(path: str | Path) -> dict[str, Any]:
    """The marker of a complete checkpoint; `IncompleteCheckpoint` naming what is wrong otherwise."""
    problem = checkpoint_problem(Path(path))
    if problem is not None:
        raise IncompleteCheckpoint(f"{path} is not a complete checkpoint: {problem}")
    return json.loads((Path(path) / CHECKPOINT_MARKER).read_text())


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is: its marker lists every file it holds,
    each with the size it was written with (and the checksum, for small files)."""
    marker_path = path / CHECKPOINT_MARKER
    if not marker_path.is_file():
        return f"no {CHECKPOINT_MARKER} (cut off while being written, or pruned to its HF folder)"
    try:
        files = json.loads(marker_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{CHECKPOINT_MARKER} is unreadable or lists no files ({type(e).__name__}: {e})"
    for name, expected in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if (size := f.stat().st_size) != expected["size"]:
            return f"{name} has {size} bytes, the marker says {expected['size']}"
        if "sha256" in expected and _sha256(f) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def describe_write_failure(out: Path, file: Path | None, error: BaseException) -> str:
    """'writing FILE (N bytes written): ERROR; F bytes free on the filesystem'. FILE is `file`, else the
    error's, else the file under `out` written last (a buffered write's error names no file). Writers that
    are not plain file writes (torch.save, safetensors) do not say the disk is full; the free space does."""
    file = file or (Path(error.filename) if isinstance(error, OSError) and error.filename else None)
    file = file or _last_written(out)
    written = file.stat().st_size if file is not None and file.is_file() else 0
    target = out if out.exists() else out.parent
    free = shutil.disk_usage(target).free if target.exists() else 0
    what = f"writing {file} ({written} bytes written)" if file is not None else f"writing under {out}"
    full = f" ({os.strerror(errno.ENOSPC)})" if free < FULL_BELOW_BYTES else ""
    return f"{what}: {type(error).__name__}: {error}; {free} bytes free on the filesystem{full}"


def _last_written(folder: Path) -> Path | None:
    files = [f for f in folder.rglob("*") if f.is_file()] if folder.is_dir() else []
    return max(files, key=lambda f: f.stat().st_mtime_ns, default=None)


# ---------------------------------------------------------------------------------------- a run's checkpoints


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Every `checkpoints/step-N` folder, complete or not, oldest first."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders whose marker is written and whose files all match it, oldest first."""
    return [p for p in checkpoint_folders(run_dir) if checkpoint_problem(p) is None]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, the one `--resume` continues from."""
    return (complete_checkpoints(run_dir) or [None])[-1]


def prune_checkpoints(run_dir: Path, keep: int | None) -> list[Path]:
    """Prune every checkpoint folder older than the newest `keep` (>= 1) complete ones to its HF folder;
    `None` keeps all whole. Folders older than those include incomplete ones (cut off, or a prune cut off);
    newer folders are never touched, so the last complete checkpoint keeps its engine state until a newer
    one is complete. Returns the pruned folders."""
    if keep is None:
        return []
    if keep < 1:
        raise ValueError(f"keep={keep}: the newest checkpoint always stays whole")
    kept = complete_checkpoints(run_dir)[-keep:]
    if not kept:
        return []
    pruned = [
        p
        for p in checkpoint_folders(run_dir)
        if p < kept[0] and ((p / ENGINE_DIR).exists() or (p / CHECKPOINT_MARKER).exists())
    ]
    for path in pruned:
        (path / CHECKPOINT_MARKER).unlink(missing_ok=True)  # first: from here on it is no checkpoint
        shutil.rmtree(path / ENGINE_DIR, ignore_errors=True)
    return pruned


@contextmanager
def writing_checkpoint(path: Path) -> Iterator[Path]:
    """Around the driver's whole save of checkpoint `path` (its own files, then the learners'): an earlier,
    cut-off attempt at the same folder is removed first, and on any error the folder is removed, so a failed
    save leaves neither a half checkpoint nor a full disk. An OSError (disk full) is raised as
    `CheckpointWriteError`, naming the file; the learners raise that themselves."""
    shutil.rmtree(path, ignore_errors=True)
    try:
        yield path
    except BaseException as e:
        detail = describe_write_failure(path, None, e) if isinstance(e, OSError) else None
        shutil.rmtree(path, ignore_errors=True)
        if detail is not None:
            raise CheckpointWriteError(path, detail) from e
        raise


# ---------------------------------------------------------------------------------------- resume


class ResumeError(ValueError):
    """`--resume RUN_DIR` cannot continue: the message names the folder and what is missing."""


@dataclass(frozen=True)
class ResumePlan:
    """What `--resume` continues from, found before anything starts."""

    run_dir: Path
    checkpoint: Path
    step: int
    ready_groups: int  # complete, untrained groups saved with the checkpoint: trained first
    in_flight_groups: int  # groups that were running or queued to run again
    partial_groups: int  # of those, the ones whose finished rollouts were saved: only the rest run again
    data_position: dict[str, Any]  # the task pool's state (epoch, cursor, ...)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # newer folders, and why they are not used

    def describe(self) -> str:
        pos = self.data_position
        where = (
            f"epoch {pos.get('epoch')}, task {pos.get('cursor')} of {pos.get('num_tasks')}"
            if pos
            else "unknown"
        )
        lines = [
            f"resuming {self.run_dir} from {self.checkpoint.name} (step {self.step}): "
            f"{self.ready_groups} saved complete groups to train first, {self.in_flight_groups} in-flight groups "
            f"to run again ({self.partial_groups} keep their finished rollouts), data position {where}"
        ]
        lines += [f"  skipped {p.name}: {why}" for p, why in self.skipped]
        return "\n".join(lines)


def resume_plan(run_dir: str | Path) -> ResumePlan:
    """Check `run_dir` for `--resume` without starting anything: it exists, holds the run's config and a
    complete checkpoint. `ResumeError` naming the folder otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ResumeError(f"--resume {run_dir}: no such directory")
    if not (run_dir / CONFIG_FILE).is_file():
        raise ResumeError(f"--resume {run_dir}: no {CONFIG_FILE}, so it is not a lightning-ray run directory")
    skipped: list[tuple[Path, str]] = []
    for path in reversed(checkpoint_folders(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            _refuse_unsafe(run_dir, path)
            return _plan(run_dir, path, skipped)
        skipped.append((path, problem))
    found = "; ".join(f"{p.name}: {why}" for p, why in skipped) or "none"
    raise ResumeError(
        f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'} (folders found: {found})"
    )


def _refuse_unsafe(run_dir: Path, path: Path) -> None:
    """`--resume` loads only safetensors and weights-only pickles: `ResumeError` naming each other file."""
    from lightning_ray.safe_pickle import unsafe_files

    if problems := unsafe_files(path):
        raise ResumeError(
            f"--resume {run_dir}: {path.name} holds files that are not safe to load:\n  "
            + "\n  ".join(problems)
        )


def _plan(run_dir: Path, path: Path, skipped: list[tuple[Path, str]]) -> ResumePlan:
    marker = json.loads((path / CHECKPOINT_MARKER).read_text())
    extra = marker.get("extra") or {}
    if "step" not in extra:
        raise ResumeError(f"--resume {run_dir}: {path.name} records no training step (not saved by a run)")
    groups, partial = path / STREAM_GROUPS, path / STREAM_PARTIAL
    partial_groups = len(json.loads(partial.read_text())) if partial.is_file() else 0
    return ResumePlan(
        run_dir=run_dir,
        checkpoint=path,
        step=int(extra["step"]),
        ready_groups=len(json.loads(groups.read_text())) if groups.is_file() else 0,
        in_flight_groups=len(extra.get("in_flight") or []) + partial_groups,
        partial_groups=partial_groups,
        data_position=extra.get("pool") or {},
        skipped=skipped,
    )
