"""Safe promotion of new weights (`inference.canary`): a new policy version goes to a canary share of the
replicas first, and reaches the others only if its reward on live traffic holds up.

One candidate at a time, driven by the process that owns the inference app (the driver; in `serve --learn`
through `lightning_ray.live.promotion`):

1. `Canary.begin(state, version)`: ceil(share x replicas) replicas (at least one, never all) load the
   candidate, a ref of an HF-named state dict (from the learners: `sync_context(...).send("object_store", {})`).
   The others keep serving the current version, which stays published in the app's registry, so a replica
   Serve restarts comes up on it and a rollback has its weights (the starting weights, which nothing
   published, are read from the model folder and published first). Serve routes requests across both, and
   every answer records the `policy_version` that produced it.
2. `Canary.observe(version, reward)`: one reward of a live rollout served by `version` (the signature of the
   live-learning hook `on_live_reward`, so it can subscribe directly; thread-safe). Only rewards observed
   since `begin` count, for both versions, so the two means cover the same stretch of traffic.
3. `Canary.settle()`: `decide()` (see `judge`), then act on it: promote (publish the candidate; the other
   replicas load it) or roll back (the replicas on the candidate reload the current version). Each promote or
   rollback appends a row with the numbers behind it to RUN_DIR/canary.jsonl and is counted in `metrics()`;
   `wait` changes nothing.
"""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import ray
from safetensors.torch import load_file

from lightning_ray.config import Config, ConfigError
from lightning_ray.weights import object_store, registry
from lightning_ray.weights.recovery import converge, update_surviving

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from lightning_ray.config.inference import CanaryConfig

LOG_NAME = "canary.jsonl"
Verdict = Literal["promote", "rollback", "wait"]


@dataclass(frozen=True)
class Decision:
    """A verdict on the candidate and the numbers behind it (means are None without rewards)."""

    decision: Verdict
    reason: str
    current_version: int
    candidate_version: int
    current_mean: float | None
    candidate_mean: float | None
    current_count: int
    candidate_count: int
    margin: float
    difference: float | None  # candidate_mean - current_mean
    difference_stderr: float | None  # standard error of that difference (for the reader; not a gate)
    waited_s: float


def _mean(rewards: list[float]) -> float | None:
    return statistics.fmean(rewards) if rewards else None


def _stderr(a: list[float], b: list[float]) -> float | None:
    if len(a) < 2 or len(b) < 2:
        return None
    return math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))


def judge(
    cfg: CanaryConfig,
    versions: tuple[int, int],
    current: list[float],
    candidate: list[float],
    waited_s: float,
) -> Decision:
    """The rule, kept explainable: once both versions (`versions`: current, candidate) have
    `cfg.min_rewards` rewards, promote when the candidate's mean reward is at least the current one's minus
    `cfg.margin`, else roll back; without enough rewards after `cfg.max_wait_s`, roll back (nothing shows the
    candidate is safe); otherwise wait."""
    cur_mean, cand_mean = _mean(current), _mean(candidate)
    diff = cand_mean - cur_mean if cur_mean is not None and cand_mean is not None else None
    enough = min(len(current), len(candidate)) >= cfg.min_rewards
    if enough and diff is not None:
        verdict: Verdict = "promote" if diff >= -cfg.margin else "rollback"
        reason = f"mean reward difference {diff:+.4f} {'>=' if verdict == 'promote' else '<'} -margin"
    elif waited_s >= cfg.max_wait_s:
        verdict = "rollback"
        reason = f"fewer than {cfg.min_rewards} rewards per version after {cfg.max_wait_s:g} s (max_wait_s)"
    else:
        verdict, reason = "wait", f"collecting rewards (min_rewards: {cfg.min_rewards} per version)"
    return Decision(
        verdict,
        reason,
        *versions,
        cur_mean,
        cand_mean,
        len(current),
        len(candidate),
        cfg.margin,
        diff,
        _stderr(current, candidate),
        waited_s,
    )


def refuse_in_train(cfg: Config) -> None:
    """A canary is judged on live rewards, which `train` does not have (its rewards come from its own rollouts,
    on the same replicas): a config asking for one there is refused rather than silently ignored."""
    if cfg.inference.canary is not None:
        raise ConfigError(
            "inference.canary: `lightning-ray train` has no live traffic to judge a candidate by (each update "
            "reaches every replica); unset it, or use `lightning-ray serve CONFIG --learn`"
        )


def canary_count(share: float, replicas: int) -> int:
    """How many of `replicas` take a candidate first: ceil(share x replicas), at least one, never all."""
    if replicas < 2:
        raise RuntimeError(
            f"inference.canary: needs at least 2 replicas (a canary share and the rest); Serve runs {replicas}"
        )
    return min(replicas - 1, max(1, math.ceil(share * replicas)))


def model_folder_state(model_dir: str) -> ray.ObjectRef:
    """The model folder's weights (its *.safetensors files) in the object store: the starting policy,
    which a rollback of the first candidate goes back to."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"inference.canary: the model folder {model_dir} has no *.safetensors file holding the starting "
            "weights to roll back to"
        )
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(str(f)))
    return ray.put(state)


@dataclass(frozen=True)
class Candidate:
    version: int
    state: ray.ObjectRef
    replicas: list[str]  # the canary replicas
    current: registry.Published  # what the others serve, and a rollback goes back to
    started: float  # time.monotonic()


class Canary:
    """One inference app's canary (see the module docstring). `run_dir` receives canary.jsonl;
    `timeout_s` bounds each load on the replicas (`inference.weight_sync_timeout_s`)."""

    def __init__(
        self, cfg: CanaryConfig, replicas: DeploymentHandle, run_dir: str | Path, timeout_s: float = 300.0
    ) -> None:
        self.cfg, self.replicas, self.timeout_s = cfg, replicas, timeout_s
        self.log_path = Path(run_dir) / LOG_NAME
        self.candidate: Candidate | None = None
        self.decided = {"promote": 0, "rollback": 0}
        self._rewards: dict[int, list[float]] = {}
        self._lock = threading.Lock()

    @property
    def app(self) -> str:
        return self.replicas.app_name

    def serving(self) -> dict[str, int]:
        """The policy version each routed replica serves, by replica id."""
        infos = self.replicas.broadcast("model_info").results(timeout_s=self.timeout_s)
        return {i["replica"]: i["policy_version"] for i in infos}

    def _current(self, serving: dict[str, int]) -> registry.Published:
        """What the app serves outside the canary; the starting weights are published first if nothing was."""
        published = registry.current(self.app)
        if published is not None:
            return published
        versions = set(serving.values()) or {0}
        if len(versions) > 1:
            raise RuntimeError(f"replicas of app {self.app!r} serve different policy versions: {serving}")
        [version] = versions
        model_dir = self.replicas.model_info.remote().result(timeout_s=self.timeout_s)["model_dir"]
        registry.publish(self.app, version, model_folder_state(model_dir))
        return registry.current(self.app)

    def begin(self, state: ray.ObjectRef, version: int) -> list[str]:
        """The canary replicas load `state` as `version`; returns their ids."""
        if self.candidate is not None:
            raise RuntimeError(
                f"policy version {self.candidate.version} is still on canary; settle it before version {version}"
            )
        serving = self.serving()
        current = self._current(serving)
        if version <= current.version:
            raise ValueError(f"canary of policy version {version}, but version {current.version} is served")
        picked = sorted(serving)[: canary_count(self.cfg.share, len(serving))]
        with self._lock:
            self._rewards = {current.version: [], version: []}
        payload = {"state": [state], "replicas": picked}
        update_surviving(self.replicas, object_store.NAME, payload, version, self.timeout_s)
        self.candidate = Candidate(version, state, picked, current, time.monotonic())
        return picked

    def observe(self, version: int, reward: float) -> None:
        """A live reward of a rollout served by `version`; ignored unless `version` is the current one or the
        candidate."""
        with self._lock:
            if version in self._rewards:
                self._rewards[version].append(float(reward))

    def decide(self) -> Decision:
        """The verdict on the candidate now (`judge`); acts on nothing."""
        cand = self.candidate
        if cand is None:
            raise RuntimeError("no policy version on canary: call begin() first")
        with self._lock:
            current, candidate = list(self._rewards[cand.current.version]), list(self._rewards[cand.version])
        waited = time.monotonic() - cand.started
        return judge(self.cfg, (cand.current.version, cand.version), current, candidate, waited)

    def settle(self) -> Decision:
        """`decide()`, and act on a promote or rollback: the replicas load it, the row goes to canary.jsonl."""
        decision = self.decide()
        if decision.decision == "wait":
            return decision
        cand = self.candidate
        assert cand is not None  # decide() raised otherwise
        if decision.decision == "promote":
            self._promote(cand)
        else:
            self._rollback(cand)
        self._log(decision, cand)
        self.decided[decision.decision] += 1
        self.candidate = None
        return decision

    def _promote(self, cand: Candidate) -> None:
        """Publish the candidate (restarts come up on it) and bring every other replica to it."""
        registry.publish(self.app, cand.version, cand.state)
        payload = {"state": [cand.state]}
        pushed = update_surviving(
            self.replicas, object_store.NAME, payload, cand.version, self.timeout_s, if_older=True
        )
        converge(self.replicas, cand.version, self.timeout_s, pushed)

    def _rollback(self, cand: Candidate) -> None:
        """The replicas serving the candidate reload the current version (still the published one)."""
        on_candidate = [r for r, v in self.serving().items() if v == cand.version]
        payload = {"state": cand.current.state, "replicas": on_candidate}
        update_surviving(self.replicas, object_store.NAME, payload, cand.current.version, self.timeout_s)
        left = [r for r, v in self.serving().items() if v == cand.version]
        if left:
            raise RuntimeError(f"replicas {left} still serve rolled-back policy version {cand.version}")

    def _log(self, decision: Decision, cand: Candidate) -> None:
        row = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            **asdict(decision),
            "canary_replicas": cand.replicas,
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self) -> dict[str, float]:
        """For the step metrics: decisions so far, and whether a candidate is on canary."""
        return {
            "canary/promoted": self.decided["promote"],
            "canary/rolled_back": self.decided["rollback"],
            "canary/pending": int(self.candidate is not None),
        }
