"""One DeepSpeed learner rank, run as a Ray actor by `LearnerGroup`.

Each rank holds a DeepSpeed engine (ZeRO 0-3, fp32 or bf16, optional CPU offload, optional LoRA through peft),
turns its Arrow shard into padded micro-batches, and takes GRPO/PPO steps. Every method that touches the
model is collective: the group calls it on all ranks at once. The jobs live in modules of their own:

- `engine`: process group, model loading and the DeepSpeed engine;
- `step`: the train step (`forward`: micro-batches and the log-prob forward pass);
- `checkpoint`: HF folder + DeepSpeed state, and resume;
- `export`: the full HF-named weights, gathered on rank 0 (sent to vLLM by `lightning_ray.weights`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from lightning_ray.config import AlgorithmConfig, LearnerConfig
from lightning_ray.learner import checkpoint, engine, step
from lightning_ray.learner.export import gather_hf_state_dict
from lightning_ray.learner.forward import micro_batches, response_logprobs
from lightning_ray.precision import resolve_precision
from lightning_ray.weights.senders import WeightSenders


class LearnerWorker(WeightSenders):
    """One learner rank. Created by `LearnerGroup` as a Ray actor; `setup()` joins the process group. Its
    weight-transfer methods (`send_weights`, ...) come from `lightning_ray.weights.senders`."""

    def __init__(self, model_path: str, learner: dict[str, Any], rank: int, world_size: int, seed: int = 0):
        self.cfg = LearnerConfig.model_validate(learner)
        self.cfg.precision = resolve_precision(self.cfg.precision)  # `auto`: this rank's hardware decides
        self.model_path = str(model_path)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        torch.set_num_threads(self.cfg.torch_threads)
        self.engine = None
        self.ref_model: torch.nn.Module | None = None
        self.pad_id = 0
        self.optimizer_steps = 0  # applied, not skipped

    # ---------------------------------------------------------------- setup

    def address(self) -> dict[str, Any]:
        """Where this rank runs (node, IP, pid), and a free port for the rendezvous when it is rank 0."""
        return engine.node_address()

    def setup(self, master_addr: str, master_port: int, local_rank: int, timeout_s: float) -> dict[str, Any]:
        """Join the process group and build the DeepSpeed engine (blocks until every rank has joined). A
        collective that waits `timeout_s` for a peer fails."""
        t0 = time.perf_counter()
        backend = engine.join_process_group(
            self.cfg, self.rank, self.world_size, master_addr, master_port, local_rank, timeout_s
        )
        torch.manual_seed(self.seed)
        model, self.pad_id = engine.load_model(self.model_path, self.cfg)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.engine = engine.build_engine(self.cfg, model)
        return {
            "setup_s": time.perf_counter() - t0,
            "trainable_params": trainable,
            "backend": backend,
            "precision": self.cfg.precision,
        }

    def _reference_model(self) -> torch.nn.Module:
        if self.ref_model is None:
            self.ref_model = engine.load_reference_model(self.model_path, self.cfg, self.engine.device)
        return self.ref_model

    # ---------------------------------------------------------------- training

    def train_step(
        self,
        shard: pa.Table,
        algorithm: dict[str, Any] | AlgorithmConfig,
        max_response_tokens: int | None = None,
    ) -> dict[str, float]:
        """One training step on this rank's shard (see `learner.step.train_step`). Collective."""
        algo = (
            algorithm if isinstance(algorithm, AlgorithmConfig) else AlgorithmConfig.model_validate(algorithm)
        )
        metrics = step.train_step(
            self.engine,
            _resolve(shard),
            self.cfg,
            algo,
            pad_id=self.pad_id,
            reference=self._reference_model,
            max_response_tokens=max_response_tokens,
        )
        self.optimizer_steps += metrics["optimizer_steps"]
        return metrics

    def compute_logprobs(self, shard: pa.Table) -> list[np.ndarray]:
        """Log-probs of each row's response tokens under the current weights (float32). Collective."""
        shard = _resolve(shard)
        micro = micro_batches(shard, self.pad_id, self.cfg, self.engine.device)
        return response_logprobs(self.engine, micro, shard.num_rows)

    # ---------------------------------------------------------------- weights and checkpoints

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """HF-named full weights on rank 0, None elsewhere. Collective under ZeRO-3."""
        return gather_hf_state_dict(self.engine.module, self.cfg.zero_stage, self.rank)

    def state_dict_ref(self):
        """The weights put once in the object store by rank 0 (an ObjectRef); None on other ranks."""
        import ray

        state = self.state_dict()
        return ray.put(state) if state is not None else None

    def save_checkpoint(self, path: str, extra: dict[str, Any] | None = None) -> None:
        """Write an HF model folder plus the DeepSpeed engine state (see `learner.checkpoint`). Collective."""
        checkpoint.save_checkpoint(
            self.engine,
            path,
            model_path=self.model_path,
            cfg=self.cfg,
            rank=self.rank,
            world_size=self.world_size,
            optimizer_steps=self.optimizer_steps,
            extra=extra,
        )

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Restore weights, optimizer and step counters from `save_checkpoint`'s folder. Collective.
        Returns the marker (with the caller's `extra`)."""
        marker, self.optimizer_steps = checkpoint.load_checkpoint(
            self.engine, path, self.cfg, self.world_size
        )
        return marker


def _resolve(shard: Any) -> pa.Table:
    """A shard is passed as an object ref (resolved by Ray when it is a top-level argument) or a table."""
    if isinstance(shard, pa.Table):
        return shard
    import ray

    if isinstance(shard, ray.ObjectRef):
        return ray.get(shard)
    raise TypeError(f"expected a pyarrow Table or an ObjectRef to one, got {type(shard).__name__}")
