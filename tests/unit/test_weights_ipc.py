"""The ipc hand-off's buffers: packing and unpacking, host shared memory between real processes (no Ray, no
vLLM), and the driver's same-node / same-GPU check."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest
import torch
from test_weights_collective import sample_state

from lightning_ray.weights.ipc import SharedWeights, check_colocated, pack, shared_tensors, unpack
from lightning_ray.weights.packing import ALIGN


def mixed_state() -> dict[str, torch.Tensor]:
    """sample_state's fp32 / bf16 / int64 / 0-dim / empty tensors, plus fp16, int8 and a non-contiguous one."""
    g = torch.Generator().manual_seed(1)
    return {
        **sample_state(),
        "half": torch.randn(4, 3, generator=g).half(),
        "bytes": torch.randint(-128, 127, (9,), dtype=torch.int8, generator=g),
        "transposed": torch.randn(6, 4, generator=g).bfloat16().t(),
    }


def assert_same(got: list[tuple[str, torch.Tensor]], state: dict[str, torch.Tensor]) -> None:
    assert [name for name, _ in got] == list(state)
    for name, t in got:
        want = state[name]
        assert t.dtype == want.dtype and t.shape == want.shape, name
        assert torch.equal(t, want), name  # bitwise for every dtype, bf16 included


def test_pack_unpack_round_trip_of_mixed_dtypes():
    state = mixed_state()
    slots, buffers = pack(state, torch.device("cpu"), bucket_bytes=1024)
    assert len(buffers) == 3  # a few buffers for all dtypes, not one per tensor
    assert all(buf.dtype == torch.uint8 and buf.dim() == 1 for buf in buffers)
    assert all(s.offset % ALIGN == 0 for s in slots)
    assert_same(list(unpack(slots, buffers)), state)


def test_unpacked_tensors_are_views_of_the_buffers():
    state = mixed_state()
    slots, buffers = pack(state, torch.device("cpu"))
    assert len(buffers) == 1
    dict(unpack(slots, buffers))["a"].zero_()
    assert not dict(unpack(slots, buffers))["a"].any()  # no copy: a consumer reads rank 0's memory


def test_host_buffers_are_shared_memory_files():
    shared = SharedWeights.pack(mixed_state(), torch.device("cpu"), bucket_bytes=1024)
    payload = shared.payload(consumers=2)
    names = {h["name"] for per_consumer in payload["handles"] for h in per_consumer}
    assert len(names) == 3 and all(Path("/dev/shm", n.decode().lstrip("/")).exists() for n in names)
    assert payload["bytes"] == sum(buf.numel() for buf in shared.buffers)
    shared.release()
    assert not any(Path("/dev/shm", n.decode().lstrip("/")).exists() for n in names)


_CPU = torch.device("cpu")


def _consume(payload: dict[str, Any], consumer: int, out: mp.Queue, device: str = "cpu") -> None:
    """A consumer process: map the buffers and report what it sees."""
    views = shared_tensors(payload, consumer, torch.device(device))
    out.put({name: (t.dtype, tuple(t.shape), _digest(t.cpu())) for name, t in views})


def consume_in_processes(payload: dict[str, Any], device: str = "cpu") -> list[dict[str, Any]]:
    """What each of the payload's consumers sees, each in a process of its own (spawned: CUDA-safe)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    consumers = range(len(payload["handles"]))
    procs = [ctx.Process(target=_consume, args=(payload, c, out, device)) for c in consumers]
    for p in procs:
        p.start()
    seen = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return seen


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def test_two_processes_map_the_same_buffers_and_the_files_go_with_the_last_mapping():
    state = mixed_state()
    shared = SharedWeights.pack(state, _CPU, bucket_bytes=1024)
    payload = shared.payload(consumers=2)
    files = [Path("/dev/shm", h["name"].decode().lstrip("/")) for h in payload["handles"][0]]
    want = {name: (t.dtype, tuple(t.shape), _digest(t)) for name, t in state.items()}
    assert consume_in_processes(payload) == [want, want]
    assert all(f.exists() for f in files)  # the consumers are gone; rank 0's mappings still hold the files
    shared.release()
    assert not any(f.exists() for f in files)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")
def test_cuda_buffers_by_ipc_handle_to_two_processes():
    state = mixed_state()
    shared = SharedWeights.pack({k: v.cuda() for k, v in state.items()}, torch.device("cuda", 0), 1024)
    payload = shared.payload(consumers=2)
    assert all(isinstance(h, bytes) for per_consumer in payload["handles"] for h in per_consumer)
    want = {name: (t.dtype, tuple(t.shape), _digest(t)) for name, t in state.items()}
    assert consume_in_processes(payload, "cuda") == [want, want]
    shared.release()


def test_a_consumer_without_handles_is_an_error():
    payload = SharedWeights.pack(mixed_state(), _CPU).payload(consumers=1)
    with pytest.raises(RuntimeError, match="no handle for worker 1"):
        list(shared_tensors(payload, 1, _CPU))


def replica(node: str, devices: list[str | None]) -> dict[str, Any]:
    return {"replica": f"r-{node}", "node_id": node, "devices": devices, "workers": len(devices)}


def test_colocation_check():
    check_colocated({"node_id": "n1", "device": None}, [replica("n1", [None]), replica("n1", [None])])
    check_colocated({"node_id": "n1", "device": "GPU-a"}, [replica("n1", ["GPU-a"])])
    with pytest.raises(ValueError, match="inference.weight_sync=ipc needs every vLLM replica on the node"):
        check_colocated({"node_id": "n1", "device": None}, [replica("n1", [None]), replica("n2", [None])])
    with pytest.raises(
        ValueError, match="inference.weight_sync=ipc on GPUs needs every vLLM worker on the GPU"
    ):
        check_colocated({"node_id": "n1", "device": "GPU-a"}, [replica("n1", ["GPU-a", "GPU-b"])])
