"""The rollout URL, the one contract between an agent's `LLM` and the gateway that records its calls.

    {root}/rollout/{rollout_id}/v1                  calls recorded for the rollout's default agent
    {root}/rollout/{rollout_id}/agent/{role}/v1     calls recorded under agent `role`

The agent side builds and parses these (`LLM.for_rollout`, `LLM.for_agent`); the gateway serves the same paths
(`ROUTE_PREFIXES`) and checks ids and roles with the same rules. Rollout ids are unguessable tokens
(`secrets.token_urlsafe`), so they are URL-safe as they are.
"""

from __future__ import annotations

import re
from typing import NamedTuple

ROLLOUT_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
ROLLOUT_ID_RULE = "1-128 characters of [A-Za-z0-9_-]"
ROLE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ROLE_RULE = "letters, digits, '_', '.', '-' (max 64 characters)"

# FastAPI path templates of the two route families; each is followed by `/v1/...`.
ROUTE_PREFIXES = ("/rollout/{rollout_id}", "/rollout/{rollout_id}/agent/{role}")

_URL = re.compile(r"^(?P<root>.*)/rollout/(?P<rollout_id>[^/]+)(?:/agent/(?P<role>[^/]+))?/v1/?$")


class RolloutURL(NamedTuple):
    root: str  # the gateway, e.g. http://127.0.0.1:8000
    rollout_id: str
    role: str | None


def check_rollout_id(rollout_id: str) -> str:
    """`rollout_id` if it is a valid rollout id, else ValueError."""
    if not ROLLOUT_ID.match(rollout_id):
        raise ValueError(f"invalid rollout id {rollout_id[:40]!r}: use {ROLLOUT_ID_RULE}")
    return rollout_id


def check_role(role: str) -> str:
    """`role` if it is a valid agent role, else ValueError."""
    if not ROLE.match(role):
        raise ValueError(f"invalid agent role {role[:70]!r}: use {ROLE_RULE}")
    return role


def rollout_url(root: str, rollout_id: str, role: str | None = None) -> str:
    """The OpenAI base URL of a rollout (and agent role) on the gateway at `root`."""
    agent = "" if role is None else f"/agent/{check_role(role)}"
    return f"{root.rstrip('/')}/rollout/{check_rollout_id(rollout_id)}{agent}/v1"


def parse_rollout_url(url: str) -> RolloutURL | None:
    """The parts of a rollout URL (trailing slash optional), or None for any other URL."""
    m = _URL.match(url)
    return RolloutURL(m["root"], m["rollout_id"], m["role"]) if m else None
