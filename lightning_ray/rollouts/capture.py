"""Keep each rollout's stdout, stderr and log lines with its trajectory, while many rollouts share a process.

`sys.stdout`/`sys.stderr` are replaced once per process by streams that write to the current rollout's buffer
(found through a contextvar, so concurrent asyncio rollouts and the threads `asyncio.to_thread` starts for sync
agents stay apart) and fall back to the real stream outside a rollout.

A rollout keeps at most `MAX_CHARS` characters: a write is cut to what still fits and the rest is only counted,
so one huge `print` (or many small ones) costs no memory beyond the cap; the logs then end with a
"[truncated]" line saying how much was not kept.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
from collections.abc import Iterator
from contextvars import ContextVar

MAX_CHARS = 64_000
MASK = "**********"


def masked(text: str | None, secret: str | None) -> str | None:
    """`text` with every occurrence of `secret` (the gateway's bearer token, which an agent may print or an
    HTTP error may echo) replaced by `MASK`, before it is kept in the run directory."""
    return text.replace(secret, MASK) if text and secret else text


class CappedBuffer:
    """The captured output of one rollout: the first `limit` characters, and a count of the rest. Thread-safe
    (the agent's threads and the threads they start write to it)."""

    def __init__(self, limit: int = MAX_CHARS):
        self.limit = limit
        self._parts: list[str] = []
        self._size = 0
        self.dropped = 0
        self._lock = threading.Lock()

    def write(self, text: str, prefix: str = "") -> None:
        """Keep `text` as far as it fits, with `prefix` before each of its lines (only the kept part is
        prefixed, so a huge write is never copied whole)."""
        with self._lock:
            room = max(0, self.limit - self._size)
            head = text[:room]
            if prefix and head:
                head = "".join(f"{prefix}{line}" for line in head.splitlines(True))
            kept = head[:room]
            self.dropped += max(0, len(text) - room) + len(head) - len(kept)
            if kept:
                self._parts.append(kept)
                self._size += len(kept)

    def getvalue(self) -> str:
        with self._lock:
            text = "".join(self._parts)
            self._parts = [text]
            if self.dropped:
                text += f"\n[truncated] {self.dropped} more characters were not kept\n"
            return text


_buffer: ContextVar[CappedBuffer | None] = ContextVar("lightning_ray_rollout_output", default=None)


class _RoutingStream(io.TextIOBase):
    def __init__(self, fallback, tag: str):
        self.fallback, self.tag = fallback, tag

    def write(self, text: str) -> int:
        buf = _buffer.get()
        if buf is None:
            return self.fallback.write(text)
        buf.write(text, "" if self.tag == "stdout" else "[stderr] ")
        return len(text)

    def flush(self) -> None:
        self.fallback.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return getattr(self.fallback, "encoding", "utf-8")


class _RolloutLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        buf = _buffer.get()
        if buf is not None:
            buf.write(f"[{record.levelname.lower()}] {record.name}: {record.getMessage()}\n")


def install() -> None:
    """Route stdout/stderr/logging per rollout in this process (idempotent)."""
    if not isinstance(sys.stdout, _RoutingStream):
        sys.stdout = _RoutingStream(sys.stdout, "stdout")
    if not isinstance(sys.stderr, _RoutingStream):
        sys.stderr = _RoutingStream(sys.stderr, "stderr")
    root = logging.getLogger()
    if not any(isinstance(h, _RolloutLogHandler) for h in root.handlers):
        root.addHandler(_RolloutLogHandler(level=logging.INFO))
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)


@contextlib.contextmanager
def captured() -> Iterator[CappedBuffer]:
    """Everything the current rollout prints or logs inside the block lands in the yielded buffer."""
    buf = CappedBuffer()
    token = _buffer.set(buf)
    try:
        yield buf
    finally:
        _buffer.reset(token)
