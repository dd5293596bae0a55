"""Per-rollout trace: the transitions recorded so far and what later calls may splice onto.

Thread-safe, so the owner of a gateway may open and close rollouts from another thread than the one the
gateway's event loop runs on. `call_index` is the order in which valid calls of a rollout reached the engine; a
call that did not finish (engine error, client gone, rollout closed first) leaves a gap and records nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from lightning_ray.agent.urls import check_rollout_id
from lightning_ray.data.schema import Transition
from lightning_ray.gateway.render import PriorCall


class UnknownRollout(KeyError):
    """The rollout id was never opened, or is already closed."""

    def __init__(self, rollout_id: str):
        super().__init__(rollout_id)
        self.rollout_id = rollout_id


@dataclass
class _Trace:
    priority: int = 0
    next_index: int = 0
    transitions: list[Transition] = field(default_factory=list)
    # full text -> the first call that ended in it; later calls that end in the same text add nothing to splice on
    history: dict[str, PriorCall] = field(default_factory=dict)
    tool_texts: dict[str, str] = field(default_factory=dict)  # tool call id -> the text that generated it


class Recorder:
    def __init__(self) -> None:
        self._traces: dict[str, _Trace] = {}
        self._lock = threading.Lock()

    def open(self, rollout_id: str, priority: int = 0) -> None:
        """Start a trace; `priority` is what the engine schedules the rollout's calls by (lower first)."""
        check_rollout_id(rollout_id)
        with self._lock:
            if rollout_id in self._traces:
                raise ValueError(f"rollout {rollout_id!r} is already open")
            self._traces[rollout_id] = _Trace(priority)

    def close(self, rollout_id: str) -> list[Transition]:
        """Forget the rollout and return its transitions in call order."""
        with self._lock:
            trace = self._traces.pop(rollout_id, None)
        if trace is None:
            raise UnknownRollout(rollout_id)
        return sorted(trace.transitions, key=lambda t: t.call_index)

    def transitions(self, rollout_id: str) -> list[Transition]:
        with self._lock:
            trace = self._get(rollout_id)
            return sorted(trace.transitions, key=lambda t: t.call_index)

    def is_open(self, rollout_id: str) -> bool:
        with self._lock:
            return rollout_id in self._traces

    def history(self, rollout_id: str) -> list[PriorCall]:
        """The finished calls of the rollout that a new prompt may splice onto."""
        with self._lock:
            return list(self._get(rollout_id).history.values())

    def reserve(self, rollout_id: str) -> tuple[int, int]:
        """The next call index of the rollout (arrival order), and the rollout's priority."""
        with self._lock:
            trace = self._get(rollout_id)
            trace.next_index += 1
            return trace.next_index - 1, trace.priority

    def record(self, rollout_id: str, transition: Transition, prior: PriorCall | None) -> bool:
        """Store a finished call; False if the rollout was closed meanwhile (the call is then dropped)."""
        with self._lock:
            trace = self._traces.get(rollout_id)
            if trace is None:
                return False
            trace.transitions.append(transition)
            if prior is not None:
                trace.history.setdefault(prior.full_text, prior)
            return True

    def remember_tool_calls(self, rollout_id: str, call_ids: list[str], text: str) -> None:
        """Remember which generated text the tool call ids handed to the client came from."""
        with self._lock:
            trace = self._traces.get(rollout_id)
            if trace is not None:
                trace.tool_texts.update(dict.fromkeys(call_ids, text))

    def tool_texts(self, rollout_id: str) -> dict[str, str]:
        """Tool call id -> generated text, for the rollout's calls so far."""
        with self._lock:
            return dict(self._get(rollout_id).tool_texts)

    def _get(self, rollout_id: str) -> _Trace:
        trace = self._traces.get(rollout_id)
        if trace is None:
            raise UnknownRollout(rollout_id)
        return trace
