"""Run one call of agent code on a thread of its own, never on the event loop that serves the gateway.

A rollout worker's asyncio loop serves the gateway and leases work; agent code must not be able to stall it.
`AgentThread` runs a sync agent directly on a fresh daemon thread, and an async agent (anything whose call
returns an awaitable) on a fresh event loop in that thread. The caller's context is copied into the thread, so
the rollout's reward sink and output capture (both contextvars) follow the agent.

Whatever the agent does ends in an `AgentOutcome`: a value, or the exception it raised, `BaseException`s such as
`SystemExit`, `KeyboardInterrupt` and a stray `CancelledError` included. Non-daemon threads the agent started
(found through its reward sink, see `rewards.started_threads`) that are still running a short grace after it
returned are reported as leaked. Daemon threads may outlive it (libraries keep background workers that way; as
the agent's own thread is a daemon, so are the threads it starts without saying `daemon=False`): they do not fail
the rollout, but the worker watches them with the rest (`lingering`), so an agent that leaves one behind on every
rollout ends in `HungAgentThreads` like one that never returns. A thread that does not finish when
asked to (a sync agent that never returns, an async agent blocking its own loop) cannot be killed: the caller
stops waiting for it and keeps an eye on it (`OutlivingThreads`), so it holds no slot that other rollouts need.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from lightning_ray.agent.rewards import BadReward, coerce_reward, current_reward_sink, started_threads

LEAK_GRACE_S = 0.5  # how long threads the agent started may take to end after it returned
HUNG_AFTER_S = 1.0  # a thread still alive this long after its rollout ended counts as hung


class LeakedThreads(RuntimeError):
    """The agent returned but left non-daemon threads running: they outlive its rollout."""

    failure_kind = "leaked_threads"

    def __init__(self, threads: list[threading.Thread]):
        self.thread_names = [describe_thread(t) for t in threads]
        super().__init__(
            f"the agent left {len(threads)} non-daemon thread(s) running after it returned "
            f"(waited {LEAK_GRACE_S:g}s): {', '.join(self.thread_names)}"
        )


def describe_thread(thread: threading.Thread) -> str:
    """Its name, and the function it runs when that says more (not for `AgentThread`s: a context's `run`)."""
    target = getattr(thread, "_target", None)
    name = getattr(target, "__qualname__", None)
    if name is None or isinstance(getattr(target, "__self__", None), contextvars.Context):
        return repr(thread.name)
    return f"{thread.name!r} (target {name})"


@dataclass(frozen=True)
class AgentOutcome:
    """What one call of agent code ended in: its value, or the exception it raised; and leaked threads."""

    value: Any = None
    error: BaseException | None = None
    leaked: list[threading.Thread] = field(default_factory=list)  # non-daemon: the rollout fails
    lingering: list[threading.Thread] = field(default_factory=list)  # daemon: watched only

    def ending(self) -> tuple[BaseException | None, float | None]:
        """The exception that decides how the agent's run ended (what it raised, threads it leaked, a reward
        that is not a finite number), else its validated reward."""
        if self.error is not None:
            return self.error, None
        if self.leaked:
            return LeakedThreads(self.leaked), None
        try:
            return None, coerce_reward(self.value)
        except BadReward as e:
            return e, None


class AgentThread:
    """One call `fn(*args)` on a daemon thread of its own; see the module docstring.

    Start it from the caller's context (the thread runs in a copy of it), `await wait(timeout)` for the outcome,
    `cancel()` to ask an async agent to stop (a no-op for sync code, which cannot be interrupted).
    """

    def __init__(self, fn: Callable[..., Any], *args: Any, name: str):
        self._fn, self._args = fn, args
        self._result: concurrent.futures.Future[AgentOutcome] = concurrent.futures.Future()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Future | None = None
        self._cancelled = False
        context = contextvars.copy_context()
        self.thread = threading.Thread(target=context.run, args=(self._main,), name=name, daemon=True)
        self.thread.start()

    async def wait(self, timeout: float | None = None) -> AgentOutcome:
        """The outcome; raises TimeoutError after `timeout` seconds (the agent keeps running: `cancel()` it)."""
        waiting = asyncio.wrap_future(self._result)
        done, _ = await asyncio.wait({waiting}, timeout=timeout)
        if not done:
            raise TimeoutError(f"agent thread {self.thread.name!r} did not finish within {timeout}s")
        return waiting.result()

    def cancel(self) -> None:
        """Cancel an async agent's task on its own loop. It only takes effect at the agent's next `await`: an
        agent blocking its loop (or sync code) runs on until it gets there, if ever."""
        with self._lock:
            self._cancelled = True
            if self._loop is not None and self._task is not None:
                # RuntimeError: its loop is already closed, the agent has finished
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._task.cancel)

    def _main(self) -> None:
        try:
            value = self._fn(*self._args)
            if isinstance(value, Awaitable):
                value = self._run_on_own_loop(value)
            ended: dict[str, Any] = {"value": value}
        except BaseException as e:  # SystemExit, KeyboardInterrupt, CancelledError are the agent's too
            ended = {"error": e}
        leaked, lingering = _leftover_threads()
        self._result.set_result(AgentOutcome(**ended, leaked=leaked, lingering=lingering))

    def _run_on_own_loop(self, awaitable: Awaitable[Any]) -> Any:
        loop = asyncio.new_event_loop()
        try:
            with self._lock:
                task = asyncio.ensure_future(awaitable, loop=loop)
                self._loop, self._task = loop, task
                if self._cancelled:
                    task.cancel()
            return loop.run_until_complete(task)
        finally:
            with self._lock:
                self._loop = self._task = None
            _close_loop(loop)


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what the agent left running on its loop, then close it (as `asyncio.run` does)."""
    try:
        leftover = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in leftover:
            t.cancel()
        if leftover:
            loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    except BaseException:  # the loop is being discarded; what it failed at is not the rollout's outcome
        pass
    finally:
        loop.close()


def _leftover_threads() -> tuple[list[threading.Thread], list[threading.Thread]]:
    """Threads started under the current rollout's reward sink still alive a short grace after it returned:
    (non-daemon, daemon)."""
    sink = current_reward_sink()
    if sink is None:
        return [], []
    me = threading.current_thread()
    deadline = time.monotonic() + LEAK_GRACE_S
    threads = [t for t in started_threads(sink) if t is not me]
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t for t in threads if t.is_alive()]
    return [t for t in alive if not t.daemon], [t for t in alive if t.daemon]


class OutlivingThreads:
    """Threads that outlive their rollout (agents that would not stop, threads they leaked). Thread-safe: a
    worker adds from its loop and reads the count from its control thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: list[tuple[threading.Thread, float, str]] = []

    def add(self, thread: threading.Thread, rollout_id: str) -> None:
        if thread.is_alive():
            with self._lock:
                self._threads.append((thread, time.monotonic(), rollout_id))

    def hung(self) -> list[str]:
        """'thread (rollout id)' of each thread still alive `HUNG_AFTER_S` after its rollout ended."""
        now = time.monotonic()
        with self._lock:
            self._threads = [entry for entry in self._threads if entry[0].is_alive()]
            return [
                f"{describe_thread(t)} of rollout {rid}"
                for t, since, rid in self._threads
                if now - since >= HUNG_AFTER_S
            ]
