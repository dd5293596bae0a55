"""The two ways to write an agent (`@rollout` on a function, a `LitAgent` subclass) and how a runner loads one.

An agent is ordinary code: it gets a task (one dataset row, a dict) and an `LLM`, talks to `llm.base_url`
with any OpenAI-compatible client, and returns its reward (or None after `emit_reward`). Sync and async
code are both fine; rollout workers run each call on a thread of its own, async code on a fresh event loop
there (`lightning_ray.rollouts.isolation`), so no agent can stall another or the gateway.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar, overload

F = TypeVar("F", bound=Callable[..., Any])

_MARK = "__lightning_ray_rollout__"


class ToolError(Exception):
    """Raise (or subclass) this when a tool the agent called failed; such rollouts are counted as
    `tool_error` instead of a generic agent exception."""


class AgentLoadError(ImportError):
    """The agent named in the config could not be imported or is not a valid agent."""


def _check_signature(fn: Callable[..., Any], what: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: let the call itself decide
        return
    try:
        sig.bind({}, None)
    except TypeError as e:
        raise TypeError(
            f"{what} must accept (task, llm) as positional arguments; signature is {sig}: {e}"
        ) from None


@overload
def rollout(fn: F, /) -> F: ...
@overload
def rollout(*, name: str | None = None) -> Callable[[F], F]: ...
def rollout(fn: Any = None, /, *, name: str | None = None) -> Any:
    """Mark a sync or async function `(task: dict, llm: LLM) -> float | None` as an agent.

    The function is returned unchanged (still callable, picklable, and async if it was), with its agent
    name attached. Use as `@rollout` or `@rollout(name="calc")`.
    """

    def mark(f: F) -> F:
        if not callable(f):
            raise TypeError(f"@rollout needs a function, got {f!r}")
        _check_signature(f, f"@rollout function {getattr(f, '__qualname__', f)!r}")
        setattr(f, _MARK, {"name": name or getattr(f, "__name__", "agent")})
        return f

    if fn is None:
        return mark
    return mark(fn)


class LitAgent(abc.ABC):
    """Base class for agents with state that lives across rollouts (a tool server, a loaded index...).

    A worker creates one instance (no arguments), calls `setup()` once before its first rollout, runs many
    rollouts on that instance concurrently, and calls `teardown()` when it shuts down. Each method may be
    sync or async. Keep per-rollout state in locals, not on `self`. Every call runs on a thread of its own, an
    async one on its own event loop: asyncio objects bound to a loop (an async client's connection pool) made in
    `setup` cannot serve the rollouts; make those per rollout.
    """

    name: str | None = None

    def setup(self) -> Any:  # noqa: B027 - optional hook, deliberately empty
        """Prepare shared resources (sync or async). Called once per worker."""

    @abc.abstractmethod
    def rollout(self, task: dict, llm: Any) -> Any:
        """Run one task and return its reward (float) or None (sync or async)."""

    def teardown(self) -> Any:  # noqa: B027 - optional hook, deliberately empty
        """Release what `setup` acquired (sync or async). Called once per worker."""


@dataclass(frozen=True)
class LoadedAgent:
    """An agent in the one shape runners need, whatever way it was written."""

    name: str
    rollout: Callable[[dict, Any], Any]
    setup: Callable[[], Any] | None = None
    teardown: Callable[[], Any] | None = None
    instance: LitAgent | None = None


def _import_spec(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AgentLoadError(f"agent {spec!r}: expected 'module:function' or 'module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise AgentLoadError(
            f"agent {spec!r}: cannot import module {module_name!r}: {e} "
            f"(working directory {os.getcwd()}, sys.path {sys.path[:4]}...)"
        ) from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AgentLoadError(
                f"agent {spec!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    return obj


def load_agent(spec: str | Any) -> LoadedAgent:
    """Resolve `module:function`, `module:Class`, a function, a LitAgent subclass or instance.

    A plain function with a `(task, llm)` signature is accepted without `@rollout`. LitAgent classes are
    instantiated here (no arguments); `setup` is not called: that is the runner's job (`call_agent`).
    """
    obj = _import_spec(spec) if isinstance(spec, str) else spec
    where = spec if isinstance(spec, str) else repr(obj)
    if inspect.isclass(obj):
        if not issubclass(obj, LitAgent):
            raise AgentLoadError(
                f"agent {where}: class {obj.__qualname__} does not subclass lightning_ray.LitAgent"
            )
        try:
            obj = obj()
        except TypeError as e:
            raise AgentLoadError(f"agent {where}: cannot instantiate {obj.__qualname__}: {e}") from e
    if isinstance(obj, LitAgent):
        _check_signature(obj.rollout, f"{type(obj).__qualname__}.rollout")
        return LoadedAgent(
            name=obj.name or type(obj).__name__,
            rollout=obj.rollout,
            setup=obj.setup,
            teardown=obj.teardown,
            instance=obj,
        )
    if callable(obj):
        try:
            _check_signature(obj, f"agent {where}")
        except TypeError as e:
            raise AgentLoadError(str(e)) from None
        meta = getattr(obj, _MARK, None) or {}
        return LoadedAgent(name=meta.get("name") or getattr(obj, "__name__", type(obj).__name__), rollout=obj)
    raise AgentLoadError(f"agent {where}: expected a function or a LitAgent, got {type(obj).__name__}")


def is_async_callable(fn: Any) -> bool:
    """True for `async def` functions/methods and objects whose `__call__` is `async def`."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


async def call_agent(fn: Callable[..., Any], *args: Any, executor: Executor | None = None) -> Any:
    """Call agent code from an event loop: await async code, run sync code in `executor` (the loop's
    default if None) with the caller's context (so `emit_reward` finds the rollout's sink), and await an
    awaitable that sync code returns. Async code shares the caller's loop: rollout workers, which must not let
    an agent stall their gateway, use `lightning_ray.rollouts.isolation.AgentThread` instead."""
    if is_async_callable(fn):
        result = await fn(*args)
    else:
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        result = await loop.run_in_executor(executor, functools.partial(ctx.run, fn, *args))
    if inspect.isawaitable(result):
        result = await result
    return result
