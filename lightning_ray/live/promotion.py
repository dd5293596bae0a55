"""`inference.canary` in `serve --learn`: the loop's weight sync, one candidate at a time.

After each learner step the new weights go to the canary replicas only (`Canary.begin`), and the loop waits
for the verdict on live rewards (`Canary.settle`, which rolls back after `max_wait_s` without enough rewards)
before it trains again, so there is never more than one candidate and the learners never run ahead of what a
rollback could return them to:

- promote: every replica serves the candidate, and the learners' state (weights and optimizer) is saved under
  RUN_DIR/canary/ as the state a later rollback returns to;
- rollback: the replicas return to the promoted version, the learners reload the saved state, and a group with
  any trained token from the rejected version is dropped (reason `rolled_back`) instead of trained: the policy
  that produced it is not one the learners descend from.

Policy versions stay unique (a rejected version's number is never reused, so no call is recorded under weights
that did not produce it); the loop's version is the one the learners hold, the last promoted.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_ray.inference.canary import Canary
from lightning_ray.live import hooks
from lightning_ray.weights import object_store, sync_context

if TYPE_CHECKING:
    from lightning_ray.config import Config
    from lightning_ray.learner.group import LearnerGroup
    from lightning_ray.rollouts.stream import RolloutStream

POLL_S = 1.0
STATE_DIR = "canary"


class CanaryRelease:
    """The loop's `release` (see `lightning_ray.loop.run_steps`): `release(step, stream, beat)` puts the
    learners' weights after `step` on canary, waits for the verdict and returns the weight-update results and the
    version the learners now hold."""

    def __init__(self, cfg: Config, learners: LearnerGroup, inference: Any, run_dir: Path) -> None:
        assert cfg.inference.canary is not None
        self.cfg, self.learners, self.inference = cfg, learners, inference
        self.canary = Canary(cfg.inference.canary, inference, run_dir, cfg.inference.weight_sync_timeout_s)
        self.state_root = run_dir / STATE_DIR
        self.version = 0  # the version the learners hold: the last promoted
        self.saved: Path | None = None
        self.waited_s = 0.0

    def __enter__(self) -> CanaryRelease:
        self._save()  # the starting state, which a rollback of the first candidate returns to
        hooks.reward_hooks.append(self.canary.observe)
        return self

    def __exit__(self, *exc: object) -> None:
        hooks.reward_hooks.remove(self.canary.observe)

    def __call__(self, step: int, stream: RolloutStream, beat: Callable[[], None]) -> tuple[list[dict], int]:
        t0 = time.perf_counter()
        state = sync_context(self.learners, self.inference, self.cfg).send(object_store.NAME, {})
        picked = self.canary.begin(state, step)
        print(f"step {step}: policy version {step} on canary replicas {picked}", flush=True)
        while (decision := self.canary.settle()).decision == "wait":
            beat()
            time.sleep(POLL_S)
        beat()
        print(f"step {step}: {decision.decision} version {step} ({decision.reason})", flush=True)
        if decision.decision == "promote":
            self.version = step
            self._save()
        else:
            marker = self.learners.load_checkpoint(self._saved())
            if marker["extra"]["version"] != self.version:
                raise RuntimeError(
                    f"{self._saved()} holds version {marker['extra']['version']}, not {self.version}"
                )
            stream.rejected.add(step)
        self.waited_s = decision.waited_s
        took = time.perf_counter() - t0
        served = self.canary.serving().items()
        results = [{"policy_version": v, "path": object_store.NAME, "total_s": took} for _, v in served]
        return results, self.version

    def metrics(self) -> dict[str, float]:
        """Decisions so far, and how long the last candidate waited for its verdict."""
        return {**self.canary.metrics(), "canary/wait_s": self.waited_s}

    def _save(self) -> None:
        """The learners' state as version `self.version`, written before the one it replaces is removed."""
        path = self.state_root / f"version-{self.version:06d}"
        if path != self.saved:
            self.learners.save_checkpoint(path, extra={"version": self.version})
            if self.saved is not None:
                shutil.rmtree(self.saved, ignore_errors=True)
            self.saved = path

    def _saved(self) -> Path:
        assert self.saved is not None, "entered before any step"
        return self.saved
