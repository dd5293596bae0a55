"""How many rollout workers an elastic run wants: `rollout.min_workers` .. `rollout.max_workers`, on queue depth.

Demand is the rollouts of the train pool that want a worker slot now (queued or leased); each worker runs
`rollout.concurrency` at once, so `ceil(demand / concurrency)` workers serve it without a queue. As in Ray
Serve's autoscaler, the count moves only after that wish has held for a while: up after
`rollout.scale_up_delay_s`, down after `rollout.scale_down_delay_s` (a step's tail, when the last groups finish
and the queue is empty, must not stop workers the next step needs). A count set by hand
(`lightning-ray scale`, kept by the task pool) wins over the queue until it is cleared.

The supervisor (`RolloutWorkers.scale`) applies the decision: new workers start and join every batch being
served; a worker scaled down is drained (it leases nothing more, finishes and reports what it runs) and
stopped, so no rollout is lost or run twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Autoscaler:
    """The worker count decision, fed one observation of the queue at a time."""

    min_workers: int
    max_workers: int
    concurrency: int
    up_delay_s: float
    down_delay_s: float
    _wish: tuple[int, float] | None = None  # (direction, since when) of the current wish to move

    def wanted(self, demand: int) -> int:
        """Workers that serve `demand` rollouts with no queue, within the bounds."""
        return min(self.max_workers, max(self.min_workers, math.ceil(demand / self.concurrency)))

    def decide(self, current: int, demand: int, now: float, requested: int | None = None) -> int:
        """The count to scale to now: `requested` (within the bounds) when set, else `wanted(demand)` once
        the wish to move that way has lasted its delay; `current` otherwise."""
        if requested is not None:
            self._wish = None
            return min(self.max_workers, max(self.min_workers, requested))
        target = self.wanted(demand)
        direction = (target > current) - (target < current)
        if direction == 0:
            self._wish = None
            return current
        if self._wish is None or self._wish[0] != direction:
            self._wish = (direction, now)
        delay = self.up_delay_s if direction > 0 else self.down_delay_s
        if now - self._wish[1] < delay:
            return current
        self._wish = None
        return target
