"""Who hears about live rewards: `reward_hooks`, a plain list of `fn(version, reward)` called once per live
rollout the client rewarded, with the policy version that served its first call (the canary subscribes here).
A hook that raises is logged and the others still run; hooks run on the gateway's event loop, so keep them
quick."""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

reward_hooks: list[Callable[[int, float], None]] = []


def on_live_reward(version: int, reward: float) -> None:
    for hook in list(reward_hooks):
        try:
            hook(version, reward)
        except Exception:
            log.exception("live reward hook %r failed", hook)
