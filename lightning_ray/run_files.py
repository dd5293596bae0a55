"""Writes of a run directory's own files (metrics.jsonl, ledger.jsonl, summary.json, the trajectories' parquet)
that a full disk cannot leave half done.

An append is one write, flushed to disk and cut back on failure; a whole file is written beside its name and
renamed over it. Either way a failed write is `RunFileWriteError` naming the file, and the file holds what it
held before. Checkpoints have their own error and clean-up (`lightning_ray.checkpoints.writing_checkpoint`).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_ray.faults import RunFault


class RunFileWriteError(RunFault):
    """A file of the run directory could not be written (disk full, ...); it is left with its earlier content."""

    def __init__(self, path: str | Path, detail: str):
        super().__init__(f"could not write {path}: {detail}")
        self.path, self.detail = str(path), detail

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.path, self.detail)


def append_bytes(path: Path, data: bytes, what: str) -> None:
    """Append `data` with a single write, flushed to disk; on failure the file is cut back to where it was and
    `RunFileWriteError` says `what` was appended, its size and the OS error."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.fstat(fd).st_size
        try:
            if os.write(fd, data) != len(data):  # a short write: the disk filled up mid-write
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            os.fsync(fd)
        except OSError as e:
            os.ftruncate(fd, end)
            raise RunFileWriteError(path, f"{what} ({len(data)} bytes): {e}") from e
    finally:
        os.close(fd)


def replace_file(path: Path, write: Callable[[Path], Any], what: str) -> Path:
    """`write(tmp)` a file beside `path` (a dot-file, which no reader of the run lists), flush it to disk and
    rename it over `path`. A crash or a full disk leaves the earlier file whole, or none, never a part of one;
    an OSError is `RunFileWriteError` saying `what` was written, and the partial file is removed."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunFileWriteError(path, f"{what}: {e}") from e
    return path
