"""`inference.weight_sync: object_store`: learner rank 0 `ray.put`s the state dict once; every replica fetches it
(zero-copy on the same node), writes it as safetensors to shared memory and its vLLM workers reload from that
file. Passing tensors through vLLM's `collective_rpc` breaks in its multi-process mode on CPU; a file in
/dev/shm does not, and costs well under a second for a 135M model. Works anywhere Ray does; the fallback of
the collective path.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from safetensors.torch import load_file, save_file

from lightning_ray.weights import registry
from lightning_ray.weights.base import Receiver, Sender, SyncContext, Tensors, WeightPath

NAME = "object_store"


class ObjectStoreSender(Sender):
    def send(self, state: dict[str, torch.Tensor], request: dict[str, Any]) -> ray.ObjectRef:
        return ray.put(state)


class FileReceiver(Receiver):
    def receive(self, payload: str, index: int) -> Tensors:
        yield from load_file(payload).items()


@contextlib.asynccontextmanager
async def stage(payload: dict[str, Any], tag: str) -> AsyncIterator[str]:
    """In the replica: fetch the state dict behind `payload["state"][0]` (wrapped in a list so Ray does not
    resolve it on the way) and give the workers a shared-memory file of it, removed afterwards."""
    path = write_shared(await payload["state"][0], tag)
    try:
        yield str(path)
    finally:
        path.unlink(missing_ok=True)


def sync(ctx: SyncContext, version: int) -> list[dict[str, Any]]:
    """Rank 0 puts the state once (`hand_off`), then every replica loads it (`load`)."""
    return load(ctx, version, hand_off(ctx))


def hand_off(ctx: SyncContext) -> ray.ObjectRef:
    """The learners' part: rank 0 puts the state in the object store; from then on the learners may step."""
    return ctx.send(NAME, {})


def load(ctx: SyncContext, version: int, state: ray.ObjectRef) -> list[dict[str, Any]]:
    """The replicas' part: the state is published (a replica starting from now on loads it), then loaded."""
    registry.publish(ctx.replicas.app_name, version, state)
    return ctx.update(NAME, {"state": [state]}, version)


def push_state(
    replicas: Any, state: ray.ObjectRef, version: int, timeout_s: float = 300.0
) -> list[dict[str, Any]]:
    """Bring every replica of the deployment handle `replicas` to the state dict behind `state` (one object,
    no per-replica copy): also for a state that did not come from the learners (a test's, a restore's). It is
    published first, and a replica lost on the way is replaced and brought to it (`recovery.converge`)."""
    from lightning_ray.weights.recovery import converge, update_surviving

    registry.publish(replicas.app_name, version, state)
    return converge(
        replicas, version, timeout_s, update_surviving(replicas, NAME, {"state": [state]}, version, None)
    )


def shm_dir() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    path = base / "lightning_ray_weights"
    path.mkdir(parents=True, exist_ok=True)
    return path


def as_tensors(state: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, whatever the learner sent (torch, or numpy from a zero-copy `ray.get`)."""
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


PATH = WeightPath(NAME, ObjectStoreSender, FileReceiver, sync, stage)
