"""The weight group's wire format and transport over gloo, between real processes (no Ray, no vLLM)."""

from __future__ import annotations

import io
import multiprocessing as mp
import time

import pytest
import torch

from lightning_ray.weights.base import expect_exhausted
from lightning_ray.weights.collective import GroupSpec, WeightGroup, host_store, new_spec
from lightning_ray.weights.packing import ALIGN, decode_header, encode_header, plan_buckets


def sample_state() -> dict[str, torch.Tensor]:
    """Mixed dtypes and shapes: a 0-dim, an empty, an odd-sized bf16 and an oversized tensor."""
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).bfloat16(),
        "scalar": torch.tensor(3.0),
        "big": torch.randn(1000, generator=g),
        "empty": torch.zeros(0),
        "ids": torch.arange(5),
    }


def test_plan_buckets_aligns_and_splits():
    state = sample_state()
    slots, sizes = plan_buckets(state, bucket_bytes=1024)
    assert [s.name for s in slots] == list(state)
    assert all(s.offset % ALIGN == 0 for s in slots)
    big = next(s for s in slots if s.name == "big")
    assert big.offset == 0 and sizes[big.bucket] == 4000  # larger than a bucket: one of its own
    for s in slots:
        assert s.offset + s.nbytes <= sizes[s.bucket]
    assert decode_header(encode_header(slots, sizes)) == (slots, sizes)


def _receiver(spec: GroupSpec, rank: int, updates: int, out: mp.Queue) -> None:
    group = WeightGroup(spec, rank)
    for _ in range(updates):
        # By value: a tensor put on a queue is shared through this process's file descriptors, which are gone
        # if it exits before the parent reads it.
        buf = io.BytesIO()
        torch.save({name: t.clone() for name, t in group.receive()}, buf)
        out.put(buf.getvalue())
    group.close()


def test_broadcast_to_two_ranks_twice():
    ctx = mp.get_context("spawn")
    store = host_store("127.0.0.1", timeout_s=60)
    spec = new_spec(store, "127.0.0.1", world_size=3, backend="gloo", timeout_s=60)
    out = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(spec, rank, 2, out)) for rank in (1, 2)]
    for p in procs:
        p.start()
    sender = WeightGroup(spec, 0, store)
    state = sample_state()
    stats = [sender.send(state, bucket_bytes=1024) for _ in range(2)]
    received = [torch.load(io.BytesIO(out.get(timeout=60))) for _ in range(4)]
    for p in procs:
        p.join(timeout=60)
    sender.close()
    assert stats[0]["tensors"] == len(state) and stats[0]["buckets"] == 3
    for got in received:
        assert list(got) == list(state)
        for name, t in state.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_missing_rank_fails_after_the_timeout():
    store = host_store("127.0.0.1", timeout_s=2)
    spec = new_spec(store, "127.0.0.1", world_size=2, backend="gloo", timeout_s=2)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError):  # torch's DistStoreError: nobody else ever joined
        WeightGroup(spec, 0, store)
    assert time.perf_counter() - t0 < 30


def test_unread_tensors_are_reported():
    stream = iter([("x", torch.zeros(1)), ("y", torch.zeros(1))])
    next(stream)
    with pytest.raises(RuntimeError, match="did not load"):
        expect_exhausted(stream)
