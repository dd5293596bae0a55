"""Which task comes next: epochs over the dataset, each in a seeded shuffle (or file order), and a position
that a checkpoint saves and a resumed run restores exactly."""

from __future__ import annotations

import hashlib
import random
from typing import Any

from lightning_ray.tasks.dataset import Task


class TaskOrder:
    def __init__(self, tasks: list[Task], *, shuffle: bool, seed: int) -> None:
        self._tasks = list(tasks)
        self.shuffle = shuffle
        self.seed = seed
        self._epoch = 0
        self._cursor = 0
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        return len(self._tasks)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self._tasks)))
        if self.shuffle:
            random.Random(f"lightning-ray:{self.seed}:{epoch}").shuffle(order)
        return order

    def draw(self, n: int) -> list[Task]:
        """The next `n` tasks, cycling through epochs."""
        drawn = []
        for _ in range(n):
            if self._cursor >= len(self._order):
                self._epoch += 1
                self._cursor = 0
                self._order = self._epoch_order(self._epoch)
            drawn.append(self._tasks[self._order[self._cursor]])
            self._cursor += 1
        return drawn

    def _digest(self) -> str:
        return hashlib.sha256("\0".join(t.task_id for t in self._tasks).encode()).hexdigest()

    def state(self) -> dict[str, Any]:
        return {
            "version": 1,
            "epoch": self._epoch,
            "cursor": self._cursor,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "num_tasks": len(self._tasks),
            "tasks_digest": self._digest(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        expected = {"shuffle": self.shuffle, "seed": self.seed, "num_tasks": len(self._tasks)}
        mismatched = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if mismatched:
            detail = ", ".join(f"{k}: saved {s!r}, now {n!r}" for k, (s, n) in mismatched.items())
            raise ValueError(f"cannot resume the task pool: {detail}")
        if state.get("tasks_digest") != self._digest():
            raise ValueError("cannot resume the task pool: the dataset's task ids or their order changed")
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor <= len(self._tasks):
            raise ValueError(f"cannot resume the task pool: invalid position epoch={epoch} cursor={cursor}")
        self._epoch, self._cursor = epoch, cursor
        self._order = self._epoch_order(epoch)
