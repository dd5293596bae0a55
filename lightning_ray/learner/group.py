"""N DeepSpeed learner ranks in a Ray placement group, driven from the GRPO loop as one object.

The group splits a trajectory table by whole GRPO groups (balanced by tokens), puts each shard in the object
store once and hands the refs to the ranks. Every call fans out to all ranks, because DeepSpeed's ZeRO
stages need each rank in every forward, backward, gather and checkpoint.

Faults end in named errors, never in a hang: every wait has a deadline, and the first rank that dies, raises
or misses the deadline stops the whole group (the others would wait for it in a collective forever), so every
later call raises `LearnerFailed` at once; resume from the last checkpoint with a new group. Steps whose loss
or gradients are not finite are skipped by the ranks; `max_bad_steps` of them in a row raise `NonFiniteSteps`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lightning_ray.config import AlgorithmConfig, LearnerConfig
from lightning_ray.faults import RunFault
from lightning_ray.learner.batch import shard_by_group
from lightning_ray.learner.worker import LearnerWorker

SKIP_REASONS = ("nonfinite_loss", "nonfinite_grad")  # as in the metrics `skipped_<reason>` of a train step


class LearnerFailed(RunFault):
    """A learner rank died, raised or did not answer in time, so the learner group was stopped."""

    def __init__(self, ranks: list[int], method: str, step: int, what: str):
        self.ranks, self.method, self.step = ranks, method, step
        who = f"learner rank {ranks[0]}" if len(ranks) == 1 else f"learner ranks {ranks}"
        super().__init__(f"{who} {what}; the learner group was stopped: resume from the last checkpoint")


class NonFiniteSteps(RunFault):
    """`max_bad_steps` train steps in a row skipped their optimizer step: the loss or gradients were not
    finite. `steps` maps each step to its reasons (`nonfinite_loss`, `nonfinite_grad`)."""

    def __init__(self, steps: dict[int, list[str]]):
        self.steps = steps
        listed = ", ".join(f"step {s} ({'+'.join(r)})" for s, r in steps.items())
        super().__init__(
            f"{len(steps)} learner steps in a row skipped their optimizer step, their loss or gradients not "
            f"finite: {listed} (trainer.max_bad_steps); check the rewards and advantages, or lower learner.lr"
        )


class LearnerGroup:
    """`learner.num_workers` LearnerWorker actors with one torch.distributed process group between them.

    `timeout_s` bounds every call (and the collectives inside the ranks: a rank waits that long for a peer);
    `max_bad_steps` is how many train steps in a row may skip their optimizer step before `NonFiniteSteps`."""

    def __init__(
        self,
        cfg: LearnerConfig,
        model_path: str | Path,
        seed: int = 0,
        timeout_s: float = 600.0,
        max_bad_steps: int = 3,
    ):
        self.cfg = cfg
        self.model_path = str(model_path)
        self.timeout_s, self.max_bad_steps = timeout_s, max_bad_steps
        self.steps = 0  # train_step calls made
        self.bad_steps: dict[int, list[str]] = {}  # the skipped steps of the current run of them
        self.failure: LearnerFailed | None = None
        n = cfg.num_workers
        bundle = {"CPU": cfg.num_cpus_per_worker, **cfg.placement.resources}  # `learner.placement`
        if cfg.num_gpus_per_worker > 0:
            bundle["GPU"] = cfg.num_gpus_per_worker
        self.placement_group = placement_group(
            [dict(bundle) for _ in range(n)],
            strategy="PACK",
            bundle_label_selector=[dict(cfg.placement.labels) for _ in range(n)]
            if cfg.placement.labels
            else None,
        )
        self.workers: list[ray.actor.ActorHandle] = []
        try:
            ray.get(self.placement_group.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.placement_group)
            raise RuntimeError(
                f"the learner placement group ({n} x {bundle}) was not scheduled within {timeout_s:.0f} s: "
                "lower learner.num_cpus_per_worker / num_gpus_per_worker or add resources"
            ) from None
        try:
            self._start(seed, timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, seed: int, timeout_s: float) -> None:
        cfg, n = self.cfg, self.cfg.num_workers

        threads = str(cfg.torch_threads)
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
        if cfg.num_gpus_per_worker == 0:
            env["DS_ACCELERATOR"] = "cpu"
        actor = ray.remote(LearnerWorker)
        self.workers = [
            actor.options(
                num_cpus=cfg.num_cpus_per_worker,
                num_gpus=cfg.num_gpus_per_worker,
                runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.placement_group, placement_group_bundle_index=rank
                ),
            ).remote(self.model_path, cfg.model_dump(), rank, n, seed)
            for rank in range(n)
        ]
        t0 = time.perf_counter()
        addresses = self._all("address")
        one_node = len({a["node_id"] for a in addresses}) == 1
        master_addr = "127.0.0.1" if one_node else addresses[0]["ip"]
        master_port = addresses[0]["port"]
        local_ranks = [
            sum(b["node_id"] == a["node_id"] for b in addresses[:i]) for i, a in enumerate(addresses)
        ]
        infos = self._all("setup", [(master_addr, master_port, lr, timeout_s) for lr in local_ranks])
        self.setup_s = time.perf_counter() - t0
        self.backend, self.precision = infos[0]["backend"], infos[0]["precision"]
        self.trainable_params = infos[0]["trainable_params"]

    def _all(self, method: str, args: list[tuple[Any, ...]] | None = None, *same: Any) -> list[Any]:
        """Call `method` on every rank at once (ZeRO needs each rank in every collective), with the rank's
        tuple of `args` or else the `same` arguments, and wait for the results, in rank order."""
        if self.failure is not None:
            f = self.failure
            what = f"had failed in {f.method} (learner step {f.step}), so {method} cannot run"
            raise LearnerFailed(f.ranks, method, self.steps, what)
        args = args or [same] * len(self.workers)
        refs = [getattr(w, method).remote(*a) for w, a in zip(self.workers, args, strict=True)]
        return self.wait(method, refs)

    def wait(self, method: str, refs: list[ray.ObjectRef], timeout_s: float | None = None) -> list[Any]:
        """The results of one call per rank (`refs` in rank order), within `timeout_s` (default: the group's).
        The first rank that fails, or the deadline, stops the group and raises `LearnerFailed`."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, timeout=max(deadline - time.monotonic(), 0.0))
            if not done:
                late = sorted(rank_of[r] for r in pending)
                self._fail(late, method, f"did not finish {method} within {timeout_s:.0f} s", None)
            for ref in done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as e:
                    fault = getattr(e, "cause", None)  # a named fault the rank raised (a full disk) is itself
                    self._fail([rank_of[ref]], method, f"{_failure(e)} during {method}", e, fault)
        return ray.get(refs)

    def _fail(
        self,
        ranks: list[int],
        method: str,
        what: str,
        cause: BaseException | None,
        fault: BaseException | None = None,
    ) -> None:
        """Stop every rank (the survivors are waiting for the failed one in a collective) and raise the rank's
        own `RunFault`, or `LearnerFailed`."""
        self.failure = LearnerFailed(ranks, method, self.steps, f"{what} (learner step {self.steps})")
        for w in self.workers:
            ray.kill(w)
        raise (fault if isinstance(fault, RunFault) else self.failure) from cause

    def _shards(self, table: pa.Table | ray.ObjectRef) -> tuple[list[ray.ObjectRef], list[np.ndarray]]:
        if isinstance(table, ray.ObjectRef):
            table = ray.get(table)
        indices = shard_by_group(table, len(self.workers))
        return [ray.put(table.take(pa.array(i))) for i in indices], indices

    def train_step(
        self,
        table: pa.Table | ray.ObjectRef,
        algorithm: AlgorithmConfig,
        max_response_tokens: int | None = None,
    ) -> dict[str, float]:
        """One step on a table with an `advantage` column (see `compute_advantages`); global metrics.

        Raises `NonFiniteSteps` when this is the `max_bad_steps`-th step in a row that skipped an optimizer
        step (its metrics `skipped_*` say why); a step that applies one ends the run of them."""
        refs, _ = self._shards(table)
        algo = algorithm.model_dump()
        self.steps += 1
        metrics = self._all("train_step", [(r, algo, max_response_tokens) for r in refs])[0]
        if metrics["skipped_steps"]:
            self.bad_steps[self.steps] = [r for r in SKIP_REASONS if metrics[f"skipped_{r}"]]
            if len(self.bad_steps) >= self.max_bad_steps:
                raise NonFiniteSteps(self.bad_steps)
        elif metrics["optimizer_steps"]:
            self.bad_steps = {}
        return metrics

    def compute_logprobs(self, table: pa.Table | ray.ObjectRef) -> list[np.ndarray]:
        """Per-row response log-probs under the current weights, in the table's row order."""
        refs, indices = self._shards(table)
        results = self._all("compute_logprobs", [(r,) for r in refs])
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * sum(len(i) for i in indices)
        for idx, rows in zip(indices, results, strict=True):
            for i, row in zip(idx.tolist(), rows, strict=True):
                out[i] = row
        return out

    def state_dict_ref(self) -> ray.ObjectRef:
        """An ObjectRef to the HF-named weights (dict name -> CPU tensor), put once by rank 0.

        Tied weights appear once under their first name (SmolLM2: `model.embed_tokens.weight`, no
        `lm_head.weight`), as in a `save_pretrained` folder; a consumer re-ties the output layer."""
        return self._all("state_dict_ref")[0]

    def save_checkpoint(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """HF folder + DeepSpeed state under `path` (must be visible to every rank's node)."""
        self._all("save_checkpoint", None, str(path), extra)
        return Path(path)

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Resume weights and optimizer from `save_checkpoint`; returns its marker (incl. `extra`)."""
        return self._all("load_checkpoint", None, str(path))[0]

    def shutdown(self) -> None:
        """Kill the ranks (dead ones too) and free their placement group (weights put by `state_dict_ref` go
        with rank 0)."""
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None


def _failure(error: ray.exceptions.RayError) -> str:
    """What happened to a rank, in words: it died (its process is gone) or raised (the error's first line)."""
    if isinstance(error, ray.exceptions.RayActorError):
        return "died"
    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) else error
    lines = str(cause).strip().splitlines()
    return f"raised {type(cause).__name__}" + (f": {lines[0]}" if lines else "")
