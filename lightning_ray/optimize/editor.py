"""The critic and the editor of the prompt search: what they are asked, and the endpoint that answers.

Both are one chat model (`optimize.editor`): any OpenAI-compatible endpoint, or by default the served policy
through a gateway of the run's own (`gateway_chat`), each call a rollout of its own that nothing trains on.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import openai

from lightning_ray.config import ConfigError, EditorConfig

Chat = Callable[[list[dict[str, str]]], str]  # messages -> the reply's text

MAX_FAILURES = 3  # failures shown to the critic: a small model's context holds few
MAX_FIELD_CHARS = 400  # each task and each transcript, cut to this

SYSTEM = "You improve the instructions given to an AI agent so that it solves more tasks."
PROMPT_TAG = re.compile(r"<prompt>(.*?)(?:</prompt>|$)", re.DOTALL)


@dataclass(frozen=True)
class Failure:
    """One rollout that did not succeed, as the critic sees it."""

    task: dict[str, Any]
    replies: list[str]  # the model's replies, in call order
    reward: float | None


def _cut(text: str) -> str:
    return text if len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS] + " ..."


def describe_failures(failures: Sequence[Failure]) -> str:
    parts = []
    for i, f in enumerate(failures[:MAX_FAILURES], 1):
        replies = " | ".join(r.strip() for r in f.replies) or "(no reply)"
        reward = "failed" if f.reward is None else f"{f.reward:g}"
        parts.append(
            f"Failure {i}:\nTask: {_cut(json.dumps(f.task))}\nAgent replies: {_cut(replies)}\nReward: {reward}"
        )
    return "\n\n".join(parts)


def critique_messages(prompt: str, failures: Sequence[Failure]) -> list[dict[str, str]]:
    """Ask for the textual gradient: what in the prompt led to these failures."""
    return [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": f"The agent was given this instruction:\n<prompt>\n{prompt}\n</prompt>\n\n"
            f"It failed these tasks:\n\n{describe_failures(failures)}\n\n"
            "In a few sentences, say what in the instruction led to these failures and how to change it.",
        },
    ]


def rewrite_messages(prompt: str, critique: str) -> list[dict[str, str]]:
    """Ask for a step along the gradient: the prompt rewritten to answer the critique."""
    return [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": f"Instruction:\n<prompt>\n{prompt}\n</prompt>\n\nCritique:\n{critique}\n\n"
            "Write an improved instruction that fixes these problems. Reply with only the new instruction "
            "between <prompt> and </prompt>.",
        },
    ]


def parse_rewrite(reply: str) -> str:
    """The text inside <prompt>...</prompt> (an unclosed tag runs to the end), else the whole reply."""
    match = PROMPT_TAG.search(reply)
    return (match.group(1) if match else reply).strip()


def critique_and_rewrite(
    chat: Chat, prompt: str, failures: Sequence[Failure], n: int
) -> tuple[str, list[str]]:
    """One critique of `prompt` from `failures`, and `n` rewrites along it (each its own sample)."""
    critique = chat(critique_messages(prompt, failures)).strip()
    return critique, [parse_rewrite(chat(rewrite_messages(prompt, critique))) for _ in range(n)]


def endpoint_chat(cfg: EditorConfig) -> Chat:
    """`optimize.editor.base_url` with its model; the key from `api_key_env` (a missing variable is a
    ConfigError naming the field)."""
    api_key = "EMPTY"
    if cfg.api_key_env is not None:
        api_key = os.environ.get(cfg.api_key_env, "")
        if not api_key:
            raise ConfigError(f"optimize.editor.api_key_env: ${cfg.api_key_env} is not set or empty")
    return _client_chat(openai.OpenAI(base_url=cfg.base_url, api_key=api_key), cfg, str(cfg.model))


def gateway_chat(gateway: Any, cfg: EditorConfig) -> Chat:
    """The served policy through `gateway` (a `lightning_ray.gateway.server.Gateway`): each call a rollout of its
    own, closed when it returns."""

    def chat(messages: list[dict[str, str]]) -> str:
        rid = f"editor-{secrets.token_urlsafe(12)}"
        gateway.open_rollout(rid)
        try:
            with openai.OpenAI(base_url=gateway.base_url(rid), api_key=gateway.api_key) as client:
                return _client_chat(client, cfg, gateway.served_model)(messages)
        finally:
            gateway.close_rollout(rid)

    return chat


def _client_chat(client: openai.OpenAI, cfg: EditorConfig, model: str) -> Chat:
    def chat(messages: list[dict[str, str]]) -> str:
        response = client.chat.completions.create(
            model=model, messages=messages, temperature=cfg.temperature, max_tokens=cfg.max_tokens
        )
        return response.choices[0].message.content or ""

    return chat
