"""Successive halving (Jamieson & Talwalkar, 2016): pick the best of many candidates for little evaluation.

With n candidates there are ceil(log2 n) rungs: the last scores the final two on all `max_tasks` validation tasks,
each rung before it half as many tasks for twice as many candidates, the better half of each rung going on. Every
rung scores on the split's first tasks, the same for every candidate, so scores within a rung compare like for
like, and the winner's score is one on all `max_tasks` tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Score = Callable[[int, int], tuple[float, dict[str, Any]]]  # (candidate index, tasks) -> (score, details)


@dataclass(frozen=True)
class Trial:
    """One candidate scored in one rung."""

    candidate: int
    rung: int
    tasks: int
    score: float
    details: dict[str, Any]


def rung_tasks(num_candidates: int, max_tasks: int) -> list[int]:
    """Tasks per candidate in each rung: halving back from `max_tasks` in the last, at least one."""
    rungs = max(1, math.ceil(math.log2(num_candidates))) if num_candidates > 1 else 1
    return [max(1, max_tasks // 2 ** (rungs - 1 - r)) for r in range(rungs)]


def successive_halving(
    num_candidates: int,
    score: Score,
    max_tasks: int,
    on_trial: Callable[[Trial], None] = lambda trial: None,
) -> tuple[int, list[Trial]]:
    """The winning candidate's index and every trial, rung by rung. Ties go to the earlier candidate. A lone
    candidate is still scored (on `max_tasks`): the run reports what it achieves."""
    if num_candidates < 1:
        raise ValueError("successive_halving: no candidates")
    if max_tasks < 1:
        raise ValueError(f"successive_halving: max_tasks={max_tasks} must be positive")
    alive: Sequence[int] = range(num_candidates)
    trials: list[Trial] = []
    for rung, tasks in enumerate(rung_tasks(num_candidates, max_tasks)):
        rung_trials = []
        for c in alive:
            value, details = score(c, tasks)
            rung_trials.append(Trial(c, rung, tasks, value, details))
            on_trial(rung_trials[-1])
        trials += rung_trials
        order = sorted(rung_trials, key=lambda t: (-t.score, t.candidate))
        alive = [t.candidate for t in order[: math.ceil(len(order) / 2)]]
    return alive[0], trials
