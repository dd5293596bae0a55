"""The `LLM` resource a rollout receives: where to send OpenAI-compatible requests, and how to sample."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

# `.../rollout/{rollout_id}/v1` or `.../rollout/{rollout_id}/agent/{role}/v1` (trailing slash optional).
_ROLLOUT_URL = re.compile(r"^(?P<prefix>.*/rollout/(?P<rollout_id>[^/]+))(?:/agent/(?P<role>[^/]+))?/v1/?$")
_ROLE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class LLM:
    """An OpenAI-compatible endpoint scoped to one rollout (and optionally one agent role).

    Pass `base_url` and `api_key` to any client (`openai.AsyncOpenAI(base_url=llm.base_url,
    api_key=llm.api_key)`), use `model` as the model name and `sampling_kwargs()` for the sampling settings
    the run was configured with. The rollout's identity lives in the URL path, so every call made through it,
    by any framework, is recorded for that rollout.
    """

    base_url: str
    api_key: str = field(default="EMPTY", repr=False)  # the gateway's bearer token when it needs one
    model: str = ""
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    top_k: int = -1  # -1: engine default; sent through `extra_body` since OpenAI's API has no top_k

    @classmethod
    def for_rollout(cls, gateway_url: str, rollout_id: str, **settings: Any) -> LLM:
        """The LLM of one rollout on a gateway at `gateway_url` (e.g. `http://127.0.0.1:8000`)."""
        if not rollout_id or "/" in rollout_id:
            raise ValueError(f"invalid rollout id {rollout_id!r}")
        return cls(base_url=f"{gateway_url.rstrip('/')}/rollout/{rollout_id}/v1", **settings)

    @property
    def rollout_id(self) -> str | None:
        """The rollout this endpoint is scoped to, or None for a plain (non-gateway) URL."""
        m = _ROLLOUT_URL.match(self.base_url)
        return m["rollout_id"] if m else None

    @property
    def role(self) -> str | None:
        """The agent role calls are recorded under, or None for the rollout's default agent."""
        m = _ROLLOUT_URL.match(self.base_url)
        return m["role"] if m else None

    def for_agent(self, role: str) -> LLM:
        """The same rollout's endpoint, with calls recorded as made by agent `role` (multi-agent training)."""
        if not _ROLE.match(role):
            raise ValueError(
                f"invalid agent role {role!r}: use letters, digits, '_', '.', '-' (max 64 chars)"
            )
        m = _ROLLOUT_URL.match(self.base_url)
        if m is None:
            raise ValueError(
                f"base_url {self.base_url!r} is not a rollout URL (…/rollout/<id>/v1), so it cannot address a role"
            )
        return dataclasses.replace(self, base_url=f"{m['prefix']}/agent/{role}/v1")

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `client.chat.completions.create(...)` carrying the configured sampling."""
        kwargs: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
        }
        if self.top_k > 0:
            kwargs["extra_body"] = {"top_k": self.top_k}
        return kwargs
