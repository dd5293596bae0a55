"""`emit_reward` and the per-rollout reward sink it writes to.

An agent may report rewards from anywhere inside its rollout: the rollout function itself, an asyncio task
it spawned, `asyncio.to_thread`, a `ThreadPoolExecutor`, or a plain `threading.Thread`. The sink is found
in this order:

1. the `ContextVar` the runner sets when it opens the sink. asyncio tasks and `asyncio.to_thread` copy
   context, so they see it directly;
2. for `ThreadPoolExecutor.submit` (and so `loop.run_in_executor`), which does not copy context, the sink
   that was current when the job was *submitted*: `install_thread_propagation()` wraps `submit` so the job
   runs with it. Pool threads are shared between rollouts, so the submitting rollout is the right owner,
   not the rollout that happened to start the thread;
3. for a plain `threading.Thread`, which starts with an empty context on Python < 3.14, a registry keyed by
   thread: the wrapped `Thread.start` records the sink current in the starting thread, so threads started
   by threads started by the agent also find it.

The wrappers only pass the sink along; they change nothing else about threads or executors, and cost a dict
write per thread start / a context-variable set per submitted job while a rollout is active.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.thread
import logging
import math
import numbers
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

_MISSING: Any = object()
# Unset: no opinion (fall back to the thread registry); None: explicitly outside any rollout.
_CURRENT_SINK: ContextVar[RewardSink | None] = ContextVar("lightning_ray_reward_sink")
_THREAD_SINKS: weakref.WeakKeyDictionary[threading.Thread, RewardSink] = weakref.WeakKeyDictionary()
_THREAD_SINKS_LOCK = threading.Lock()
_INSTALL_LOCK = threading.Lock()
_installed = False


@dataclass(frozen=True)
class EmittedReward:
    """One `emit_reward` call: the value, named dimensions, wall-clock time, and the LLM call it follows."""

    value: float
    dims: dict[str, float] = field(default_factory=dict)
    time: float = 0.0
    call_index: int | None = None  # index of the latest LLM call of the rollout when emitted, if known

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "dims": dict(self.dims),
            "time": self.time,
            "call_index": self.call_index,
        }


class RewardSink:
    """Collects the rewards of one rollout. Thread-safe; closed when the rollout ends."""

    def __init__(
        self,
        rollout_id: str | None = None,
        latest_call_index: Callable[[], int | None] | None = None,
        on_emit: Callable[[EmittedReward], None] | None = None,
    ) -> None:
        self.rollout_id = rollout_id
        self._latest_call_index = latest_call_index
        self._on_emit = on_emit
        self._lock = threading.Lock()
        self._rewards: list[EmittedReward] = []
        self._closed = False
        self.late = 0  # emits that arrived after the rollout ended (from threads the agent left running)

    def emit(self, value: float, dims: dict[str, float]) -> None:
        call_index = None
        if self._latest_call_index is not None:
            try:
                call_index = self._latest_call_index()
            except Exception:  # a broken index lookup must not turn into an agent failure
                log.exception("latest_call_index() failed for rollout %s", self.rollout_id)
        reward = EmittedReward(value=value, dims=dims, time=time.time(), call_index=call_index)
        with self._lock:
            closed = self._closed
            if closed:
                self.late += 1
            else:
                self._rewards.append(reward)
        if closed:
            warnings.warn(
                f"emit_reward({value}) arrived after rollout {self.rollout_id} ended; it was dropped",
                RuntimeWarning,
                stacklevel=3,
            )
        elif self._on_emit is not None:
            self._on_emit(reward)

    @property
    def rewards(self) -> list[EmittedReward]:
        with self._lock:
            return list(self._rewards)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            self._closed = True


def current_reward_sink() -> RewardSink | None:
    """The sink of the rollout the calling code runs in, or None outside any rollout."""
    sink = _CURRENT_SINK.get(_MISSING)
    if sink is not _MISSING:
        return sink
    with _THREAD_SINKS_LOCK:
        return _THREAD_SINKS.get(threading.current_thread())


def started_threads(sink: RewardSink) -> list[threading.Thread]:
    """The threads started inside the rollout of `sink` (and by those threads) that are still registered:
    how a runner finds the threads an agent left running."""
    with _THREAD_SINKS_LOCK:
        return [t for t, s in _THREAD_SINKS.items() if s is sink]


class BadReward(TypeError, ValueError):
    """A reward that is not a finite real number (NaN, infinite, an int too large for a float, a string...).

    A TypeError and a ValueError at once, as the two checks it replaced raised; `failure_kind` tells
    `lightning_ray.monitor.errors.classify_exception` which kind of failure it is."""

    failure_kind = "bad_reward"


def describe_value(value: Any, max_chars: int = 120) -> str:
    """`type: repr`, short, for a message; never raises (huge ints have no repr beyond 4300 digits)."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"{type(value).__name__}: an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except Exception as e:  # a broken __repr__ must not hide the reward error
        text = f"<repr failed: {type(e).__name__}>"
    if len(text) > max_chars:
        text = f"{text[:max_chars]}... ({len(text)} characters)"
    return f"{type(value).__name__}: {text}"


def _check_number(name: str, value: Any) -> float:
    if not isinstance(value, numbers.Real):
        raise BadReward(f"{name} must be a real number, got {describe_value(value)}")
    try:
        out = float(value)
    except (OverflowError, ValueError, TypeError) as e:
        raise BadReward(f"{name} does not fit a float, got {describe_value(value)} ({e})") from None
    if not math.isfinite(out):
        raise BadReward(f"{name} must be finite, got {describe_value(value)}")
    return out


def emit_reward(value: float, **dims: float) -> None:
    """Report a reward for the current rollout, e.g. `emit_reward(0.7, correct=1.0, format=0.4)`.

    May be called several times (intermediate rewards); see `rollout_reward` for how they combine with the
    value the agent returns. `dims` are named components kept beside the scalar for analysis; they do not
    enter the scalar. Raises RuntimeError outside a rollout, so a lost reward is never silent (to try an
    agent by hand, wrap the call in `open_reward_sink()`).
    """
    checked = _check_number("reward", value)
    checked_dims = {str(k): _check_number(f"reward dimension {k!r}", v) for k, v in dims.items()}
    sink = current_reward_sink()
    if sink is None:
        raise RuntimeError(
            "emit_reward() was called outside a rollout (no reward sink in this context or thread). "
            "Rollout workers open one per rollout; to run an agent by hand use "
            "`with lightning_ray.agent.open_reward_sink() as sink: ...`."
        )
    sink.emit(checked, checked_dims)


@contextmanager
def open_reward_sink(
    rollout_id: str | None = None,
    latest_call_index: Callable[[], int | None] | None = None,
    on_emit: Callable[[EmittedReward], None] | None = None,
) -> Iterator[RewardSink]:
    """Open the reward sink of one rollout for the code run inside the `with` block (and what it starts).

    `latest_call_index`, if given, is called at every emit (in the emitting thread) and should return the
    index of the rollout's latest LLM call, so a reward can be credited to the call it follows. `on_emit`, if
    given, gets each reward kept, in the emitting thread (a remote runner sends it to its gateway). Read
    `sink.rewards` after the block; the sink is closed on exit and later emits are dropped with a warning.
    Use it inside the asyncio task (or thread) that runs the rollout: each task has its own context.
    """
    install_thread_propagation()
    sink = RewardSink(rollout_id, latest_call_index, on_emit)
    token = _CURRENT_SINK.set(sink)
    try:
        yield sink
    finally:
        _CURRENT_SINK.reset(token)
        sink.close()


def coerce_reward(value: Any) -> float | None:
    """Validate what an agent returned: None (no reward) or a finite real number; anything else raises
    `BadReward`, naming the value's type and value."""
    if value is None:
        return None
    return _check_number("the rollout's return value (its reward)", value)


def rollout_reward(returned: float | None, emitted: list[EmittedReward]) -> float | None:
    """The rollout's scalar reward: the value the agent returned if it returned one, else the sum of its
    emitted rewards (intermediate rewards add up, as a return does in RL), else None (no reward)."""
    if returned is not None:
        return float(returned)
    if emitted:
        return math.fsum(r.value for r in emitted)
    return None


def _run_with_sink(sink: RewardSink | None, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    token = _CURRENT_SINK.set(sink)
    try:
        return fn(*args, **kwargs)
    finally:
        _CURRENT_SINK.reset(token)


def install_thread_propagation() -> None:
    """Make threads and thread-pool jobs started inside a rollout find its sink. Idempotent."""
    global _installed
    with _INSTALL_LOCK:
        if _installed:
            return
        original_start = threading.Thread.start
        original_submit = concurrent.futures.ThreadPoolExecutor.submit

        def start(self: threading.Thread) -> None:
            sink = current_reward_sink()
            # Pool worker threads outlive the rollout that started them; their jobs carry the sink instead.
            if sink is not None and getattr(self, "_target", None) is not concurrent.futures.thread._worker:
                with _THREAD_SINKS_LOCK:
                    _THREAD_SINKS[self] = sink
            original_start(self)

        def submit(
            self: concurrent.futures.ThreadPoolExecutor, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
        ):
            sink = current_reward_sink()
            if sink is None:
                return original_submit(self, fn, *args, **kwargs)
            return original_submit(self, _run_with_sink, sink, fn, *args, **kwargs)

        start.__doc__, submit.__doc__ = original_start.__doc__, original_submit.__doc__
        threading.Thread.start = start  # type: ignore[method-assign]
        concurrent.futures.ThreadPoolExecutor.submit = submit  # type: ignore[method-assign]
        _installed = True
