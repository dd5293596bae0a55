"""The plain-text tool protocol and the episode loop, independent of any LLM client.

Each model reply is one of:

* a final answer: it contains ``<answer>...</answer>``; the episode ends and the reward reads that reply;
* a tool call: ``<calc>expression</calc>`` (or an unclosed ``<calc>expression`` to the end of its line);
  the agent runs :func:`examples.calc.tool.run_tool` and sends back ``Result: ...`` or ``Error: ...`` as a
  user message, up to ``max_tool_calls`` times;
* neither: the episode ends with no answer (reward 0), so format is what the model must learn first.

An answer wins over a call in the same reply: the model has committed to a number.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from examples.calc.prompt import SYSTEM_RULE, initial_messages
from examples.calc.reward import ANSWER_TAG
from examples.calc.tool import run_tool

MAX_TOOL_CALLS = 3

CALC_TAG = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
UNCLOSED_CALC = re.compile(r"<calc>([^\n<]*)")

Chat = Callable[[list[dict[str, str]]], Awaitable[str]]


@dataclass(frozen=True)
class Action:
    """What a model reply asks for: ``calc`` (with the expression), ``answer`` or ``none``."""

    kind: Literal["calc", "answer", "none"]
    text: str = ""


@dataclass(frozen=True)
class Turn:
    """The agent's response to one reply: finish, or send ``feedback`` back as the next user message."""

    done: bool
    feedback: str | None = None
    action: Action = field(default_factory=lambda: Action("none"))


@dataclass
class Episode:
    """One finished conversation: every message, the final reply and how many tool calls were made."""

    messages: list[dict[str, str]]
    final_reply: str = ""
    tool_calls: int = 0
    ended_by: Literal["answer", "no_action", "tool_budget"] = "no_action"


def parse_reply(reply: str) -> Action:
    """Classify a model reply as a final answer, a tool call or neither."""
    answer = ANSWER_TAG.search(reply)
    if answer:
        return Action("answer", answer.group(1).strip())
    call = CALC_TAG.search(reply) or UNCLOSED_CALC.search(reply)
    if call and call.group(1).strip():
        return Action("calc", call.group(1).strip())
    return Action("none")


def handle_reply(reply: str, tool_calls_left: int) -> Turn:
    """Decide the next step after ``reply``; runs the tool when the reply is an allowed call."""
    action = parse_reply(reply)
    if action.kind == "calc" and tool_calls_left > 0:
        return Turn(done=False, feedback=run_tool(action.text), action=action)
    return Turn(done=True, action=action)


def end_reason(action: Action) -> Literal["answer", "no_action", "tool_budget"]:
    """Why an episode stopped at ``action``."""
    if action.kind == "answer":
        return "answer"
    return "tool_budget" if action.kind == "calc" else "no_action"


def start_episode(question: str, system: str = SYSTEM_RULE) -> Episode:
    """A fresh episode holding the opening messages for ``question`` under the system prompt ``system``."""
    return Episode(messages=initial_messages(question, system))


def record_reply(episode: Episode, reply: str) -> bool:
    """Append ``reply`` (and the tool's feedback) to ``episode``; return True when the episode is over."""
    turn = handle_reply(reply, MAX_TOOL_CALLS - episode.tool_calls)
    episode.messages.append({"role": "assistant", "content": reply})
    if turn.done:
        episode.final_reply, episode.ended_by = reply, end_reason(turn.action)
        return True
    episode.tool_calls += 1
    episode.messages.append({"role": "user", "content": turn.feedback or ""})
    return False


async def run_episode(question: str, chat: Chat, system: str = SYSTEM_RULE) -> Episode:
    """Talk to the model through ``chat`` until it answers, stops using the protocol or exhausts the tool."""
    episode = start_episode(question, system)
    done = False
    while not done:
        done = record_reply(episode, await chat(episode.messages))
    return episode
