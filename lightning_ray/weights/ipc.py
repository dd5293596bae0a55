"""`inference.weight_sync: ipc`: weights handed from learner rank 0 to the vLLM workers on its machine by handle.

Rank 0 packs its HF-named tensors into a few flat uint8 buffers (the layout of `packing.plan_buckets`:
every tensor at an aligned byte offset, any dtype, bf16 included), then exports each buffer to every consumer
(one vLLM worker) as a handle: a CUDA IPC handle for a GPU buffer, the name of a POSIX shared-memory file for a
host buffer. The payload (slot metadata plus handles, a few KB) travels through Ray; each worker maps the
buffers, takes views and loads them. Nothing is copied through the object store, a socket or a file.

Lifetimes, from torch's own sharing code:

* CUDA (`torch.multiprocessing.reductions.reduce_tensor`): every export wraps the allocation in a fresh
  reference counter set to 1, and a consumer decrements it when it frees its rebuilt tensor; the producer
  frees the memory (or parks it in torch's limbo until `torch.cuda.ipc_collect`) only once the counter is 0.
  One export serves exactly one consumer, so rank 0 exports every buffer once per vLLM worker.
* CPU (the `file_system` strategy's storage, `/dev/shm/torch_*`): the file holds a count of live mappings and
  is unlinked when the last mapping closes. torch's pickling (`reduce_storage`) adds one pending reference per
  pickle that exactly one rebuild consumes; one handle opened by several workers would unbalance it. Here a
  handle carries no pending reference: each worker's mapping counts for itself, rank 0's own mapping keeps
  the file alive until every replica confirmed, and the file goes when the last of them is dropped — also when
  a worker fails or never opens it.

Rank 0 keeps its buffers until the driver says every replica loaded (`release`). A replica on another node
(or, on GPUs, another GPU) than rank 0 is an error naming `inference.weight_sync`.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lightning_ray.weights.base import (
    Backend,
    Receiver,
    Sender,
    SyncContext,
    Tensors,
    WeightPath,
    transfer_device,
    worker_index,
    worker_slots,
)
from lightning_ray.weights.packing import BUCKET_BYTES, Slot, bucket_views, fill_bucket, plan_buckets

NAME = "ipc"

Handle = dict[str, Any] | bytes  # host: shm file name and size; GPU: pickled `reduce_tensor` arguments
# The index of the device in `rebuild_cuda_tensor`'s arguments: the consumer's own device index goes there.
DEVICE_ARG = 6


def new_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """A flat uint8 buffer another process can map: in a shared-memory file on the host, in ordinary CUDA
    memory on a GPU (every CUDA allocation can be exported)."""
    if device.type == "cuda":
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    storage = torch.UntypedStorage._new_using_filename_cpu(max(nbytes, 1))  # an empty file cannot be mapped
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))


def pack(
    state: Mapping[str, torch.Tensor], device: torch.device, bucket_bytes: int = BUCKET_BYTES
) -> tuple[list[Slot], list[torch.Tensor]]:
    """Copy `state` into a few shareable buffers on `device`; returns every tensor's slot and the buffers."""
    slots, sizes = plan_buckets(state, bucket_bytes)
    buffers = [fill_bucket(new_buffer(size, device), b, slots, state) for b, size in enumerate(sizes)]
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # the copies landed before any consumer reads
    return slots, buffers


def unpack(slots: list[Slot], buffers: list[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of `pack`, in order, as views into the buffers."""
    for bucket, buf in enumerate(buffers):
        yield from bucket_views(buf, bucket, slots)


def export(buf: torch.Tensor) -> Handle:
    """One consumer's handle to `buf` (see the module docstring for who frees what)."""
    if buf.is_cuda:
        from torch.multiprocessing.reductions import reduce_tensor

        _, args = reduce_tensor(buf)
        return pickle.dumps(args)
    manager, name, size = buf.untyped_storage()._share_filename_cpu_()
    return {"manager": manager, "name": name, "size": size}


def open_buffer(handle: Handle, device: torch.device) -> torch.Tensor:
    """Map an exported buffer in this process (GPU handles onto `device`, the same GPU as the producer's)."""
    if isinstance(handle, bytes):
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        args = list(pickle.loads(handle))
        args[DEVICE_ARG] = device.index if device.index is not None else torch.cuda.current_device()
        return rebuild_cuda_tensor(*args)
    storage = torch.UntypedStorage._new_shared_filename_cpu(handle["manager"], handle["name"], handle["size"])
    return torch.empty(0, dtype=torch.uint8).set_(storage)


@dataclass
class SharedWeights:
    """Rank 0's packed weights, alive until `release`."""

    slots: list[Slot]
    buffers: list[torch.Tensor]

    @classmethod
    def pack(
        cls, state: Mapping[str, torch.Tensor], device: torch.device, bucket_bytes: int = BUCKET_BYTES
    ) -> SharedWeights:
        return cls(*pack(state, device, bucket_bytes))

    def payload(self, consumers: int) -> dict[str, Any]:
        """What every replica receives: the slots, and per consumer (vLLM worker) its handle to each buffer.
        Plain values only (it passes through Ray and vLLM's `collective_rpc`)."""
        return {
            "slots": [asdict(s) for s in self.slots],
            "handles": [[export(buf) for buf in self.buffers] for _ in range(consumers)],
            "bytes": sum(buf.numel() for buf in self.buffers),
        }

    def release(self) -> None:
        """Drop rank 0's buffers; GPU memory still mapped by a consumer waits in torch's limbo until it is not."""
        on_gpu = any(buf.is_cuda for buf in self.buffers)
        self.buffers = []
        if on_gpu:
            torch.cuda.ipc_collect()


def shared_tensors(payload: dict[str, Any], consumer: int, device: torch.device) -> Tensors:
    """Consumer `consumer`'s view of a payload: each tensor, in order, as a view into the mapped buffers.
    A generator: the mappings close when it is exhausted (or dropped)."""
    if not 0 <= consumer < len(payload["handles"]):
        raise RuntimeError(
            f"weight hand-off for {len(payload['handles'])} vLLM workers has no handle for worker {consumer}"
        )
    slots = [Slot.from_dict(s) for s in payload["slots"]]
    buffers = [open_buffer(h, device) for h in payload["handles"][consumer]]
    yield from unpack(slots, buffers)


class HandleSender(Sender):
    """Rank 0 packs into shareable buffers (on its GPU under nccl, in host shared memory under gloo) and returns
    the payload for `request["consumers"]` vLLM workers; the buffers live until `release`."""

    copy = False  # packing copies the live parameters, and nothing steps before that is done

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        self.shared: SharedWeights | None = None

    @property
    def device(self) -> torch.device:
        return transfer_device(self.backend)

    def send(self, state: dict[str, torch.Tensor], request: dict[str, Any]) -> dict[str, Any]:
        self.release()
        self.shared = SharedWeights.pack(state, self.device)
        return self.shared.payload(request["consumers"])

    def release(self) -> None:
        if self.shared is not None:
            self.shared.release()
        self.shared = None


class HandleReceiver(Receiver):
    def receive(self, payload: dict[str, Any], replica: str) -> Tensors:
        consumer = worker_index(payload["worker_slots"], replica, self.worker.rank)
        return shared_tensors(payload, consumer, self.worker.device)


def sync(ctx: SyncContext, version: int) -> list[dict[str, Any]]:
    """Check every replica is beside learner rank 0, let rank 0 pack and export its weights for every vLLM
    worker, have every replica load them, then free rank 0's buffers (also on a failure)."""
    replicas = ctx.status(NAME)
    check_colocated(ctx.learner_status(NAME), replicas)
    try:
        payload = ctx.send(NAME, {"consumers": sum(r["workers"] for r in replicas)})
        results = ctx.update(NAME, {**payload, "worker_slots": worker_slots(replicas)}, version)
    finally:
        ctx.release(NAME)
    buffers = len(payload["handles"][0]) if payload["handles"] else 0
    return [{**r, "bytes": payload["bytes"], "buffers": buffers} for r in results]


def check_colocated(learner: dict[str, Any], replicas: list[dict[str, Any]]) -> None:
    """The hand-off maps memory of learner rank 0's machine: every replica must run on its Ray node and, when
    the buffers are on a GPU (`learner["device"]` is its UUID), every vLLM worker on that GPU."""
    for r in replicas:
        if r["node_id"] != learner["node_id"]:
            raise ValueError(
                f"inference.weight_sync=ipc needs every vLLM replica on the node of learner rank 0 "
                f"({learner['node_id']}), but replica {r['replica']} runs on node {r['node_id']}: use "
                "inference.weight_sync=collective or object_store across nodes"
            )
        if learner["device"] is not None and any(d != learner["device"] for d in r["devices"]):
            raise ValueError(
                f"inference.weight_sync=ipc on GPUs needs every vLLM worker on the GPU of learner rank 0 "
                f"({learner['device']}), but replica {r['replica']} uses {r['devices']}: use "
                "inference.weight_sync=collective when learner and vLLM have GPUs of their own"
            )


PATH = WeightPath(NAME, HandleSender, HandleReceiver, sync)
