"""The wire format shared by the collective and ipc paths: tensors packed into a few flat uint8 buckets.

Every tensor gets a `Slot` (bucket, aligned byte offset, dtype, shape) from `plan_buckets`; senders copy
tensors into buckets with `fill_bucket`, receivers take views back out with `bucket_views`. Packing as bytes
keeps a transfer dtype-agnostic (bf16 included) and turns ~270 tensors into a few transfers; receivers get
views into each bucket, so nothing is copied twice. The collective path sends the slots ahead of the buckets
as a JSON header (`encode_header`/`decode_header`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

BUCKET_BYTES = 256 << 20
ALIGN = 64  # every tensor starts at a multiple of this, so a byte view can be reinterpreted as any dtype


@dataclass(frozen=True)
class Slot:
    """Where one tensor lies in the stream: bucket index and byte range inside it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    bucket: int
    offset: int
    nbytes: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Slot:
        return cls(**{**d, "shape": tuple(d["shape"])})


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
    return [Slot.from_dict(s) for s in data["slots"]], list(data["sizes"])
