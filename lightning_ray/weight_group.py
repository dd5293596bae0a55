"""A standalone process group between learner rank 0 and every vLLM worker, and the wire format of one update.

Rank 0 is learner rank 0; ranks 1..N are the vLLM workers of every replica (tensor-parallel workers included).
The group is built from a `TCPStore` (hosted by learner rank 0) and a `ProcessGroupGloo` or `ProcessGroupNCCL`
constructed directly, so it never touches the default process group of either side (DeepSpeed's on the
learner, vLLM's own inside each engine). The same code runs with gloo on CPU and NCCL on GPUs; only the
device of the buffers differs.

One update, all ranks in lockstep: a header (its byte length, then JSON naming every tensor with its dtype,
shape, bucket and byte offset), then the weights packed into flat uint8 buckets of about `BUCKET_BYTES`.
Packing as bytes keeps the transfer dtype-agnostic (bf16 included) and turns ~270 tensors into a few
broadcasts; receivers get views into each bucket, so nothing is copied twice.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist

Backend = Literal["gloo", "nccl"]
STORE_PREFIX = "lightning-ray-weights"
BUCKET_BYTES = 256 << 20
ALIGN = 64  # every tensor starts at a multiple of this, so a byte view can be reinterpreted as any dtype


@dataclass(frozen=True)
class GroupSpec:
    """Everything a rank needs to join the group (plain values: it travels through Ray and `collective_rpc`)."""

    group_id: str
    host: str
    port: int
    world_size: int
    backend: Backend
    timeout_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Slot:
    """Where one tensor lies in the stream: bucket index and byte range inside it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    bucket: int
    offset: int
    nbytes: int


def transfer_device(backend: Backend) -> torch.device:
    """Where a rank's buffers live: the current GPU for NCCL, host memory for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def device_identity(backend: Backend) -> str | None:
    """The physical GPU this rank would use (its UUID) under NCCL; None under gloo.

    NCCL cannot put two ranks of one communicator on the same GPU, so the driver checks these are distinct
    before building the group (learner and vLLM sharing one GPU need a CUDA IPC hand-off instead)."""
    if backend != "nccl":
        return None
    return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


def local_ip_towards(host: str, port: int) -> str:
    """The address of this machine's interface that routes to `host` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


def host_store(host: str, timeout_s: float) -> dist.TCPStore:
    """The rendezvous store, served by learner rank 0 on a port the OS picks (read it back from `.port`)."""
    return dist.TCPStore(
        host, 0, None, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
    )


def new_spec(
    store: dist.TCPStore, host: str, world_size: int, backend: Backend, timeout_s: float
) -> GroupSpec:
    return GroupSpec(uuid.uuid4().hex, host, store.port, world_size, backend, timeout_s)


def _backend_pg(spec: GroupSpec, rank: int, store: dist.Store) -> dist.ProcessGroup:
    """A gloo or NCCL backend object built directly, the way `torch.distributed.new_group` builds one, over a
    store prefixed with the group id (a rebuilt group never reads an older group's keys)."""
    prefixed = dist.PrefixStore(f"{STORE_PREFIX}/{spec.group_id}", store)
    timeout = timedelta(seconds=spec.timeout_s)
    if spec.backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = False
    else:
        options = dist.ProcessGroupGloo._Options()
        options._devices = [
            dist.ProcessGroupGloo.create_device(hostname=local_ip_towards(spec.host, spec.port))
        ]
        options._threads = 2
    options._timeout = timeout
    options.global_ranks_in_group = list(range(spec.world_size))
    options.group_name = f"{STORE_PREFIX}-{spec.group_id}"
    backend_class = dist.ProcessGroupNCCL if spec.backend == "nccl" else dist.ProcessGroupGloo
    pg = backend_class(prefixed, rank, spec.world_size, options)
    pg._set_sequence_number_for_group()
    return pg


class WeightGroup:
    """One rank's membership: broadcast from rank 0, with the group's timeout on every operation."""

    def __init__(self, spec: GroupSpec, rank: int, store: dist.TCPStore | None = None):
        if not 0 <= rank < spec.world_size:
            raise ValueError(f"rank {rank} is outside the weight group of size {spec.world_size}")
        self.spec, self.rank = spec, rank
        self.device = transfer_device(spec.backend)
        self.timeout = timedelta(seconds=spec.timeout_s)
        # A joining rank is a client of rank 0's store; the client retries the connection until the timeout.
        self.store = store or dist.TCPStore(spec.host, spec.port, None, is_master=False, timeout=self.timeout)
        self.pg = _backend_pg(spec, rank, self.store)
        # Gloo connects in its constructor, NCCL at its first collective: one tiny broadcast makes joining a
        # rendezvous on both, so a missing rank fails here (after the timeout) and not in the first update.
        self._broadcast(torch.zeros(1, dtype=torch.int64, device=self.device))

    @property
    def group_id(self) -> str:
        return self.spec.group_id

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        # An explicit timeout makes NCCL block this thread until the transfer landed (or raise), like gloo.
        self.pg.broadcast([tensor], opts).wait(self.timeout)
        return tensor

    def send(self, state: Mapping[str, torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> dict[str, int]:
        """Rank 0: broadcast every tensor of `state`, in its order. Returns tensor and byte counts."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 (the learner) sends weights")
        slots, sizes = plan_buckets(state, bucket_bytes)
        header = encode_header(slots, sizes)
        self._broadcast(torch.tensor([header.numel()], dtype=torch.int64, device=self.device))
        self._broadcast(header.to(self.device))
        for bucket, size in enumerate(sizes):
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            self._broadcast(fill_bucket(buf, bucket, slots, state))
        return {"tensors": len(slots), "bytes": sum(sizes), "buckets": len(sizes)}

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Ranks 1..N: the tensors rank 0 sends, in its order, as views into each received bucket.

        A generator: each bucket is received when the consumer reaches it, so loading overlaps receiving and
        at most a bucket or two is alive at once. The consumer must exhaust it (see `expect_exhausted`)."""
        (length,) = self._broadcast(torch.empty(1, dtype=torch.int64, device=self.device)).tolist()
        header = self._broadcast(torch.empty(length, dtype=torch.uint8, device=self.device))
        slots, sizes = decode_header(header.cpu())
        for bucket, size in enumerate(sizes):
            buf = self._broadcast(torch.empty(size, dtype=torch.uint8, device=self.device))
            yield from bucket_views(buf, bucket, slots)

    def close(self) -> None:
        """Leave the group (local: peers notice at their next operation, through the timeout)."""
        if self.pg is not None:
            self.pg.shutdown()
            self.pg = None


def expect_exhausted(stream: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Receive what a consumer left unread, so the group stays in step, then report the unread names."""
    left = [name for name, _ in stream]
    if left:
        raise RuntimeError(f"the weight update held {len(left)} tensors the model did not load: {left[:5]}")


def plan_buckets(state: Mapping[str, torch.Tensor], bucket_bytes: int) -> tuple[list[Slot], list[int]]:
    """Assign each tensor, in order, a bucket and an aligned byte offset; a tensor larger than `bucket_bytes`
    gets a bucket of its own. Returns the slots and the byte size of each bucket."""
    slots: list[Slot] = []
    sizes: list[int] = []
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        offset = -(-sizes[-1] // ALIGN) * ALIGN if sizes else 0
        if not sizes or (sizes[-1] > 0 and offset + nbytes > bucket_bytes):
            sizes.append(0)
            offset = 0
        sizes[-1] = offset + nbytes
        dtype = str(tensor.dtype).removeprefix("torch.")
        slots.append(Slot(name, dtype, tuple(tensor.shape), len(sizes) - 1, offset, nbytes))
    return slots, sizes


def fill_bucket(
    buf: torch.Tensor, bucket: int, slots: list[Slot], state: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Copy the tensors `plan_buckets` put in `bucket` into the flat uint8 `buf`, at their offsets."""
    for slot in slots:
        if slot.bucket == bucket:
            src = state[slot.name].detach().contiguous().reshape(-1).view(torch.uint8)
            buf[slot.offset : slot.offset + slot.nbytes].copy_(src)
    return buf


def bucket_views(buf: torch.Tensor, bucket: int, slots: list[Slot]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of `bucket`, in order, as views into `buf` with their dtype and shape (no copy)."""
    for slot in slots:
        if slot.bucket == bucket:
            raw = buf[slot.offset : slot.offset + slot.nbytes]
            yield slot.name, raw.view(getattr(torch, slot.dtype)).view(slot.shape)


def encode_header(slots: list[Slot], sizes: list[int]) -> torch.Tensor:
    text = json.dumps({"sizes": sizes, "slots": [asdict(s) for s in slots]})
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)


def decode_header(header: torch.Tensor) -> tuple[list[Slot], list[int]]:
    data = json.loads(header.numpy().tobytes().decode())
    slots = [Slot(**{**s, "shape": tuple(s["shape"])}) for s in data["slots"]]
    return slots, list(data["sizes"])
