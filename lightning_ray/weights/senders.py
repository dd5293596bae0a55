"""The learner side of every weight path: rank 0's senders and the calls the driver makes on the learners.

`LearnerWorker` inherits `WeightSenders`. Every rank gathers the full HF-named weights for a send (a
collective under ZeRO-3: all ranks must take part); rank 0 hands them to the path's `Sender`, which it keeps
between updates (a process group, shared buffers in flight).
"""

from __future__ import annotations

from typing import Any

from lightning_ray.weights.base import Backend, Sender, device_identity


class WeightSenders:
    """Needs `self.rank`, `self.engine` (DeepSpeed) and `self.cfg.zero_stage` from the class it is mixed into."""

    def _sender(self, path: str, backend: Backend) -> Sender:
        from lightning_ray.weights import PATHS

        senders: dict[str, Sender] = self.__dict__.setdefault("_weight_senders", {})
        sender = senders.get(path)
        if sender is None or sender.backend != backend:
            if sender is not None:
                sender.close()
            sender = senders[path] = PATHS[path].sender(backend)
        return sender

    def weights_status(self, path: str, backend: Backend) -> dict[str, Any]:
        """Rank 0's Ray node, its GPU under `backend` (None under gloo) and the path's state."""
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": device_identity(backend),
            **self._sender(path, backend).status(),
        }

    def prepare_weights(self, path: str, backend: Backend, request: dict[str, Any]) -> Any:
        return self._sender(path, backend).prepare(request)

    def send_weights(self, path: str, backend: Backend, request: dict[str, Any]) -> Any:
        """Gather the weights (on every rank) and send them from rank 0; None on other ranks."""
        from lightning_ray.learner.export import gather_hf_state_dict

        sender = self._sender(path, backend)
        state = gather_hf_state_dict(
            self.engine.module, self.cfg.zero_stage, self.rank, sender.device, copy=sender.copy
        )
        return None if state is None else sender.send(state, request)

    def release_weights(self, path: str) -> None:
        sender = self.__dict__.get("_weight_senders", {}).get(path)
        if sender is not None:
            sender.release()

    def close_weights(self) -> None:
        for sender in self.__dict__.get("_weight_senders", {}).values():
            sender.close()
