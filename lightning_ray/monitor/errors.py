"""Classify why a rollout failed, and reduce failure messages to templates that recur.

Kinds, and the rules that pick them (first match wins):

0. a kind the runner detected itself: an exception in the chain whose class declares `failure_kind`, one of
   the kinds (`bad_reward`: the reward returned or emitted is NaN, infinite, overflows a float or is not a
   number, `lightning_ray.agent.rewards.BadReward`; `leaked_threads`: the agent returned but left non-daemon
   threads running, `lightning_ray.rollouts.isolation.LeakedThreads`).
1. `truncated_context`: an LLM/gateway HTTP error anywhere in the exception chain answered 400 with code
   `context_length_exceeded` (or a message saying the context length was exceeded, as vLLM words it): the
   conversation no longer fits the model. Also a rollout that produced *no reward* and whose last LLM call
   ended with finish_reason "length": the cut-off answer is the likely reason. A rollout that did return a
   reward after a "length" finish is NOT a failure: being cut off is part of what the policy must learn
   (dropping those samples would hide long-winded answers from training); count it as a metric instead.
2. `inference_error`: the gateway answered 503 `inference_replica_lost`: the vLLM replica died under the call
   and every re-send (`inference.request_retries`) failed too. Not the agent's doing, so the pool runs the
   rollout again (`RETRIED_KINDS`).
   `llm_error`: any other `openai.APIError` (status, connection, timeout, response validation) in the chain,
   or an `httpx`/`httpx2` error whose request went to the rollout's gateway (`llm_base_url` given).
3. `timeout`: the runner's per-rollout timeout fired (`timed_out=True`), or the agent raised a bare
   `TimeoutError` (asyncio/concurrent timeouts are that type too).
4. `tool_error`: an exception in the chain whose class, or one of its base classes, is named like a tool
   failure (the word "Tool" in CamelCase: `ToolError`, `ToolException`, `CalculatorToolError`; not
   `Toolbox...`) or is defined in a module with a `tool`/`tools` package component (`x.tools.y`,
   `my_tools`, `tool_utils`). `lightning_ray.ToolError` is there for agents to raise or subclass.
5. `agent_exception`: anything else the agent raised (type, message, traceback kept).
6. `no_reward`: the agent returned None and emitted no reward.
"""

from __future__ import annotations

import re
import traceback as tb
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit


class FailureKind(StrEnum):
    AGENT_EXCEPTION = "agent_exception"
    TOOL_ERROR = "tool_error"
    LLM_ERROR = "llm_error"
    INFERENCE_ERROR = "inference_error"
    TRUNCATED_CONTEXT = "truncated_context"
    TIMEOUT = "timeout"
    NO_REWARD = "no_reward"
    BAD_REWARD = "bad_reward"
    LEAKED_THREADS = "leaked_threads"


MAX_TRACEBACK_CHARS = 16_000
REPLICA_LOST_CODE = "inference_replica_lost"  # the gateway's 503 code (`lightning_ray.gateway.engine`)
RETRIED_KINDS = frozenset({"inference_error"})  # the pool runs such a rollout again while attempts remain


@dataclass(frozen=True)
class Failure:
    """Why one rollout failed. `exc_type`/`message` describe the exception that decided the kind (e.g. the
    openai error inside an agent's wrapper exception); `traceback` is the whole chain."""

    kind: str
    exc_type: str | None = None
    message: str = ""
    traceback: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def template(self) -> str:
        return message_template(self.message)

    @property
    def status(self) -> str:
        """The TaskPool status to report it under: `timed_out` for timeouts, else `failed`."""
        return "timed_out" if self.kind == FailureKind.TIMEOUT else "failed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Failure:
        return cls(
            kind=d["kind"],
            exc_type=d.get("exc_type"),
            message=d.get("message", ""),
            traceback=d.get("traceback", ""),
            detail=dict(d.get("detail") or {}),
        )


# ---- message templates -----------------------------------------------------------------------------------

_NORMALISERS: list[tuple[re.Pattern[str], str]] = [
    # quoted strings, but not apostrophes inside words ("can't")
    (re.compile(r"(?<![\w])'[^'\n]*'(?![\w])"), "<str>"),
    (re.compile(r'(?<![\w])"[^"\n]*"(?![\w])'), "<str>"),
    (
        re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"),
        "<uuid>",
    ),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "<hex>"),
    # ids: long tokens mixing letters and digits (token_urlsafe rollout ids, hashes, request ids)
    (re.compile(r"(?<![\w-])(?=[\w-]*\d)(?=[\w-]*[A-Za-z])[\w-]{16,}(?![\w-])"), "<id>"),
    # numbers, dotted ones (versions, IPs) too, with or without a unit ("3.5s", "404")
    (re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)*(?:[eE][-+]?\d+)?"), "<num>"),
]


def message_template(message: str, max_chars: int = 300) -> str:
    """`message` with numbers, ids, uuids, hex addresses and quoted strings replaced by placeholders, so
    failures that differ only in such values group together."""
    text = " ".join(message.split())
    for pattern, placeholder in _NORMALISERS:
        text = pattern.sub(placeholder, text)
    return text[:max_chars]


# ---- exception inspection --------------------------------------------------------------------------------


def type_name(exc_or_type: BaseException | type) -> str:
    cls = exc_or_type if isinstance(exc_or_type, type) else type(exc_or_type)
    module = cls.__module__
    return cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"


def exception_chain(exc: BaseException, limit: int = 64) -> list[BaseException]:
    """`exc`, its causes and contexts (suppressed ones too), and the members of exception groups."""
    seen: set[int] = set()
    out: list[BaseException] = []
    stack = [exc]
    while stack and len(out) < limit:
        e = stack.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        stack.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
    return out


def format_traceback(exc: BaseException, max_chars: int = MAX_TRACEBACK_CHARS) -> str:
    text = "".join(tb.format_exception(exc))
    if len(text) <= max_chars:
        return text
    head = max_chars // 4
    return f"{text[:head]}\n... [{len(text) - max_chars} characters cut] ...\n{text[-(max_chars - head) :]}"


_CONTEXT_EXCEEDED = re.compile(
    r"context_length_exceeded|maximum context length|context length (?:is|of|exceeded)|"
    r"exceeds? the (?:model's )?(?:maximum )?context|prompt is too long",
    re.IGNORECASE,
)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _llm_error_detail(exc: BaseException, llm_base_url: str | None) -> dict[str, Any] | None:
    """HTTP facts of an LLM/gateway error, or None if `exc` is not one."""
    module_root = type(exc).__module__.split(".")[0]
    detail: dict[str, Any] = {}
    if module_root == "openai":
        try:
            import openai
        except ImportError:  # pragma: no cover - openai is a dependency
            return None
        if not isinstance(exc, openai.APIError):
            return None
        detail["status_code"] = getattr(exc, "status_code", None)
        detail["code"] = getattr(exc, "code", None)
        detail["error_type"] = getattr(exc, "type", None)
        body = getattr(exc, "body", None)
        detail["body"] = str(body)[:2000] if body is not None else None
    elif module_root in ("httpx", "httpx2"):
        try:
            url = str(exc.request.url)  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):  # RequestError raised without a request
            return None
        if llm_base_url is None or _origin(url) != _origin(llm_base_url):
            return None  # an HTTP call to something else: a tool, not the LLM
        response = getattr(exc, "response", None)
        detail["status_code"] = getattr(response, "status_code", None)
        if response is not None:
            try:
                body = response.json()
                err = body.get("error", body) if isinstance(body, dict) else {}
                detail["code"] = err.get("code") if isinstance(err, dict) else None
                detail["body"] = str(body)[:2000]
            except Exception:  # unread stream or not JSON: status is enough
                detail["code"] = None
    else:
        return None
    try:
        detail["url"] = str(exc.request.url)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        detail["url"] = None
    return detail


def _is_context_exceeded(exc: BaseException, detail: dict[str, Any]) -> bool:
    if detail.get("code") == "context_length_exceeded":
        return True
    if detail.get("status_code") not in (400, 413, None):
        return False
    return bool(_CONTEXT_EXCEEDED.search(f"{exc} {detail.get('body') or ''}"))


_TOOL_NAME = re.compile(r"(?:^|[a-z0-9_])Tool(?:[A-Z_]|$)")
_TOOL_MODULE_PART = re.compile(r"^(?:tools?|.*_tools?|tools?_.*)$")


def is_tool_exception(exc: BaseException) -> bool:
    """The tool-failure rule (see the module docstring): by class name or defining module, base classes too."""
    for cls in type(exc).__mro__:
        if cls.__module__ == "builtins":
            continue
        if _TOOL_NAME.search(cls.__name__):
            return True
        if any(_TOOL_MODULE_PART.match(part) for part in cls.__module__.split(".")):
            return True
    return False


def _failure(kind: FailureKind, exc: BaseException, top: BaseException, **detail: Any) -> Failure:
    return Failure(
        kind=kind.value,
        exc_type=type_name(exc),
        message=str(exc) or repr(exc),
        traceback=format_traceback(top),
        detail={k: v for k, v in detail.items() if v is not None},
    )


_DECLARED_KINDS = {FailureKind.BAD_REWARD.value, FailureKind.LEAKED_THREADS.value}


def classify_exception(exc: BaseException, llm_base_url: str | None = None) -> Failure:
    """The Failure for an exception that escaped an agent (rules 0-5 of the module docstring)."""
    chain = exception_chain(exc)
    for e in chain:
        kind = getattr(type(e), "failure_kind", None)
        if kind in _DECLARED_KINDS:
            return _failure(FailureKind(kind), e, exc)
    llm_errors = [(e, d) for e in chain if (d := _llm_error_detail(e, llm_base_url)) is not None]
    for e, d in llm_errors:
        if _is_context_exceeded(e, d):
            return _failure(FailureKind.TRUNCATED_CONTEXT, e, exc, **d)
    for e, d in llm_errors:
        if d.get("status_code") == 503 and d.get("code") == REPLICA_LOST_CODE:
            return _failure(FailureKind.INFERENCE_ERROR, e, exc, **d)
    if llm_errors:
        e, d = llm_errors[0]
        return _failure(FailureKind.LLM_ERROR, e, exc, **d)
    if isinstance(exc, TimeoutError):
        return _failure(FailureKind.TIMEOUT, exc, exc)
    for e in chain:
        if is_tool_exception(e):
            return _failure(FailureKind.TOOL_ERROR, e, exc)
    return _failure(FailureKind.AGENT_EXCEPTION, exc, exc)


def classify_outcome(
    *,
    exception: BaseException | None = None,
    timed_out: bool = False,
    timeout_s: float | None = None,
    reward: float | None = None,
    last_finish_reason: str | None = None,
    llm_base_url: str | None = None,
) -> Failure | None:
    """How a rollout ended, for the runner: None if it succeeded (it has a reward), else its Failure.

    `reward` is the rollout's final reward (`lightning_ray.agent.rollout_reward`); `last_finish_reason` the
    finish reason of its last LLM call, if it made any.
    """
    if timed_out:
        return Failure(
            kind=FailureKind.TIMEOUT.value,
            exc_type=type_name(exception) if exception is not None else None,
            message=f"rollout did not finish within {timeout_s:g}s" if timeout_s else "rollout timed out",
            traceback=format_traceback(exception) if exception is not None else "",
            detail={"timeout_s": timeout_s} if timeout_s else {},
        )
    if exception is not None:
        return classify_exception(exception, llm_base_url)
    if reward is not None:
        return None
    if last_finish_reason == "length":
        return Failure(
            kind=FailureKind.TRUNCATED_CONTEXT.value,
            message="no reward, and the last LLM call was cut off (finish_reason 'length')",
            detail={"finish_reason": "length"},
        )
    return Failure(kind=FailureKind.NO_REWARD.value, message="the agent returned None and emitted no reward")
