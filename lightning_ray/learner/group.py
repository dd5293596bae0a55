"""N DeepSpeed learner ranks in a Ray placement group, driven from the GRPO loop as one object.

The group splits a trajectory table by whole GRPO groups (balanced by tokens), puts each shard in the object
store once and hands the refs to the ranks. Every call fans out to all ranks, because DeepSpeed's ZeRO
stages need each rank in every forward, backward, gather and checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lightning_ray.config import AlgorithmConfig, LearnerConfig
from lightning_ray.learner.batch import shard_by_group
from lightning_ray.learner.worker import LearnerWorker


class LearnerGroup:
    """`learner.num_workers` LearnerWorker actors with one torch.distributed process group between them."""

    def __init__(self, cfg: LearnerConfig, model_path: str | Path, seed: int = 0, timeout_s: float = 600.0):
        self.cfg = cfg
        self.model_path = str(model_path)
        n = cfg.num_workers
        bundle = {"CPU": cfg.num_cpus_per_worker}
        if cfg.num_gpus_per_worker > 0:
            bundle["GPU"] = cfg.num_gpus_per_worker
        self.placement_group = placement_group([dict(bundle) for _ in range(n)], strategy="PACK")
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
        addresses = self._all(lambda w: w.address.remote(), timeout=timeout_s)
        one_node = len({a["node_id"] for a in addresses}) == 1
        master_addr = "127.0.0.1" if one_node else addresses[0]["ip"]
        master_port = addresses[0]["port"]
        local_ranks = [
            sum(b["node_id"] == a["node_id"] for b in addresses[:i]) for i, a in enumerate(addresses)
        ]
        infos = ray.get(
            [
                w.setup.remote(master_addr, master_port, lr)
                for w, lr in zip(self.workers, local_ranks, strict=True)
            ],
            timeout=timeout_s,
        )
        self.setup_s = time.perf_counter() - t0
        self.backend = infos[0]["backend"]
        self.trainable_params = infos[0]["trainable_params"]

    def _all(
        self, call: Callable[[ray.actor.ActorHandle], ray.ObjectRef], timeout: float | None = None
    ) -> list[Any]:
        """Make `call` on every rank at once (ZeRO needs each rank in every collective) and wait for the
        results, in rank order: `self._all(lambda w: w.save_checkpoint.remote(path))`."""
        return ray.get([call(w) for w in self.workers], timeout=timeout)

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
        """One step on a table with an `advantage` column (see `compute_advantages`); global metrics."""
        refs, _ = self._shards(table)
        algo = algorithm.model_dump()
        results = ray.get(
            [
                w.train_step.remote(r, algo, max_response_tokens)
                for w, r in zip(self.workers, refs, strict=True)
            ]
        )
        return results[0]

    def compute_logprobs(self, table: pa.Table | ray.ObjectRef) -> list[np.ndarray]:
        """Per-row response log-probs under the current weights, in the table's row order."""
        refs, indices = self._shards(table)
        results = ray.get([w.compute_logprobs.remote(r) for w, r in zip(self.workers, refs, strict=True)])
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * sum(len(i) for i in indices)
        for idx, rows in zip(indices, results, strict=True):
            for i, row in zip(idx.tolist(), rows, strict=True):
                out[i] = row
        return out

    def state_dict_ref(self) -> ray.ObjectRef:
        """An ObjectRef to the HF-named weights (dict name -> CPU tensor), put once by rank 0.

        Tied weights appear once under their first name (SmolLM2: `model.embed_tokens.weight`, no
        `lm_head.weight`), as in a `save_pretrained` folder; a consumer re-ties the output layer."""
        return self._all(lambda w: w.state_dict_ref.remote())[0]

    def save_checkpoint(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """HF folder + DeepSpeed state under `path` (must be visible to every rank's node)."""
        self._all(lambda w: w.save_checkpoint.remote(str(path), extra))
        return Path(path)

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Resume weights and optimizer from `save_checkpoint`; returns its marker (incl. `extra`)."""
        return self._all(lambda w: w.load_checkpoint.remote(str(path)))[0]

    def shutdown(self) -> None:
        """Kill the ranks and free their placement group (weights put by `state_dict_ref` go with rank 0)."""
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None
