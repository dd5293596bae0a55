"""Keep each rollout's stdout, stderr and log lines with its trajectory, while many rollouts share a process.

`sys.stdout`/`sys.stderr` are replaced once per process by streams that write to the current rollout's buffer
(found through a contextvar, so concurrent asyncio rollouts and the threads `asyncio.to_thread` starts for sync
agents stay apart) and fall back to the real stream outside a rollout.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar

_buffer: ContextVar[io.StringIO | None] = ContextVar("lightning_ray_rollout_output", default=None)
MAX_CHARS = 64_000


class _RoutingStream(io.TextIOBase):
    def __init__(self, fallback, tag: str):
        self.fallback, self.tag = fallback, tag

    def write(self, text: str) -> int:
        buf = _buffer.get()
        if buf is None:
            return self.fallback.write(text)
        if buf.tell() < MAX_CHARS:
            buf.write(
                text
                if self.tag == "stdout"
                else "".join(f"[stderr] {line}" for line in text.splitlines(True))
            )
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
        if buf is not None and buf.tell() < MAX_CHARS:
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
def captured() -> Iterator[io.StringIO]:
    """Everything the current rollout prints or logs inside the block lands in the yielded buffer."""
    buf = io.StringIO()
    token = _buffer.set(buf)
    try:
        yield buf
    finally:
        _buffer.reset(token)
