"""The faults that stop a training run, each with a name, and the one way the driver waits on an actor.

Every fault below ends the run with its cause in the message; the last complete checkpoint resumes it
(`lightning-ray train CONFIG --resume RUN_DIR`). The driver never waits without a deadline: `get` bounds each
wait and turns the death of the actor it waits on into the fault named for that actor; `stall_check` bounds a
wait loop (a batch of rollouts) by its progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# Start-up (workers' gateways and agent setup, DeepSpeed engines) may take this long whatever the stall window: a
# backstop on waits that a slow but healthy start must not trip.
STARTUP_DEADLINE_S = 600.0


class RunFault(RuntimeError):
    """A fault that stopped the run; what stopped it is in the message."""


class RunStalled(RunFault):
    """Nothing progressed for `trainer.stall_timeout_s`, or one wait of the driver outlasted it."""


class TaskPoolLost(RunFault):
    """The task pool actor died: the leases it held are gone with it, so the run stops and resumes from the
    last checkpoint, which holds the pool's data position."""


class WorkersExhausted(RunFault):
    """Rollout workers kept dying: `rollout.max_worker_restarts` replacements were used up."""


def first_line(err: BaseException) -> str:
    """The error's type and the first line of its message (at most 300 characters)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def get(refs: Any, what: str, timeout_s: float, lost: type[RunFault] | None = None) -> Any:
    """`ray.get(refs)` that waits at most `timeout_s` (RunStalled naming `what` after that) and, given `lost`,
    raises it when the actor behind `refs` died."""
    import ray  # here: the faults are imported where Ray is not (the CLI's checks before it starts)
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        raise RunStalled(f"{what}: no answer within {timeout_s:.0f} s (trainer.stall_timeout_s)") from None
    except RayActorError as e:
        if lost is None:
            raise
        raise lost(f"{what}: the actor died ({first_line(e)})") from e


def stall_check(what: str, timeout_s: float, read: Callable[[], Any]) -> Callable[[], None]:
    """A check for a wait loop that has no deadline of its own (a batch that takes as long as it takes): call it
    on each turn. It reads the progress counters with `read` (at most every `timeout_s / 20`, 0.5-10 s, as the
    watchdog does) and raises `RunStalled` naming `what` once they stood still for `timeout_s`."""
    poll_s = min(10.0, max(0.5, timeout_s / 20))
    seen, moved = read(), time.monotonic()
    next_read = moved + poll_s

    def check() -> None:
        nonlocal seen, moved, next_read
        now = time.monotonic()
        if now < next_read:
            return
        value, next_read = read(), now + poll_s
        if value != seen:
            seen, moved = value, now
        elif now - moved >= timeout_s:
            raise RunStalled(
                f"{what}: nothing progressed for {now - moved:.0f} s (trainer.stall_timeout_s={timeout_s:.0f}); "
                f"it stayed at {value}"
            )

    return check
