"""`inference.weight_sync: collective`: a process group between learner rank 0 and every vLLM worker.

Rank 0 is learner rank 0; ranks 1..N are the vLLM workers of every replica (tensor-parallel workers included,
in `worker_slots` order). The group is built from a `TCPStore` hosted by learner rank 0 and a
`ProcessGroupGloo` or `ProcessGroupNCCL` constructed directly, so it never touches the default process group
of either side (DeepSpeed's on the learner, vLLM's own inside each engine). The same code runs with gloo on
CPU and NCCL on GPUs; only the device of the buffers differs.

One update, all ranks in lockstep: a header (its byte length, then the JSON slots of `packing`), then the
weights packed into flat uint8 buckets. The group is built at the first update and reused; before each update
the driver checks that every live replica is in it with the learner and rebuilds it when not (a replica
restarted or was added). An update that fails in the group (a rank died or timed out mid-transfer) goes
through the object store instead, with a warning, and the group is rebuilt at the next update: the replicas
always end up with the new weights.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import socket
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist

from lightning_ray.weights import object_store
from lightning_ray.weights.base import (
    DRIVER_TIMEOUTS,
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
from lightning_ray.weights.packing import (
    BUCKET_BYTES,
    bucket_views,
    decode_header,
    encode_header,
    fill_bucket,
    plan_buckets,
)

NAME = "collective"
STORE_PREFIX = "lightning-ray-weights"
GROUP_FAILURES = (ray.exceptions.RayError, TimeoutError)
log = logging.getLogger(__name__)


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
    if spec.backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = False
    else:
        options = dist.ProcessGroupGloo._Options()
        options._devices = [
            dist.ProcessGroupGloo.create_device(hostname=local_ip_towards(spec.host, spec.port))
        ]
        options._threads = 2
    options._timeout = timedelta(seconds=spec.timeout_s)
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

    def receive(self) -> Tensors:
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


class GroupSender(Sender):
    """Learner rank 0 as rank 0 of the group. `prepare` hosts the rendezvous and joins in a thread, so the
    driver can let the vLLM workers join meanwhile; `send` waits for the join, then broadcasts."""

    copy = False  # the broadcast has finished with the tensors before this actor can take another step

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        self.group: WeightGroup | None = None
        self._joining: concurrent.futures.Future[WeightGroup] | None = None

    @property
    def device(self) -> torch.device:
        return transfer_device(self.backend)

    def status(self) -> dict[str, Any]:
        group = self._group(wait=False)
        return {"group_id": group.group_id, "world_size": group.spec.world_size} if group else {}

    def prepare(self, request: dict[str, Any]) -> dict[str, Any]:
        """A new group of `request["world_size"]` ranks (the old one left); returns its spec."""
        self.close()
        host = ray.util.get_node_ip_address()
        store = host_store(host, request["timeout_s"])
        spec = new_spec(store, host, request["world_size"], self.backend, request["timeout_s"])
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weight-group")
        self._joining = pool.submit(WeightGroup, spec, 0, store)
        pool.shutdown(wait=False)
        return spec.as_dict()

    def _group(self, wait: bool) -> WeightGroup | None:
        if self._joining is not None and (wait or self._joining.done()):
            joining, self._joining = self._joining, None
            self.group = joining.result()
        return self.group

    def send(self, state: dict[str, torch.Tensor], request: dict[str, Any]) -> dict[str, int]:
        group = self._group(wait=True)
        if group is None:
            raise RuntimeError("learner rank 0 is in no weight group: the driver must build one first")
        try:
            return group.send(state)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a join that failed has nothing to leave
            self._group(wait=True)
        if self.group is not None:
            self.group.close()
        self.group = None


def _shared_nccl_env(backend: Backend) -> contextlib.AbstractContextManager[None]:
    """NCCL settings vLLM pinned for its own communicators (batch-invariant mode) must not reach one shared
    with the learner, whose process does not set them: NCCL does not reconcile them and the ranks would hang."""
    if backend != "nccl":
        return contextlib.nullcontext()
    from vllm.utils.nccl import unpinned_nccl_env

    return unpinned_nccl_env()


class GroupReceiver(Receiver):
    """A vLLM worker as rank 1 + its worker index."""

    group: WeightGroup | None = None

    def status(self) -> dict[str, Any]:
        g = self.group
        return {"group_id": g.group_id, "world_size": g.spec.world_size} if g else {"group_id": None}

    def prepare(self, request: dict[str, Any], replica: str) -> str:
        """Join the group `request["spec"]`; blocks until every rank joined (or the group's timeout)."""
        self.close()
        spec = GroupSpec(**request["spec"])
        with _shared_nccl_env(spec.backend):
            self.group = WeightGroup(
                spec, 1 + worker_index(request["worker_slots"], replica, self.worker.rank)
            )
        return self.group.group_id

    def receive(self, payload: dict[str, Any], replica: str) -> Tensors:
        if self.group is None or self.group.group_id != payload["group_id"]:
            raise RuntimeError(f"this vLLM worker is not in weight group {payload['group_id']}")
        return self.group.receive()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        self.group = None


def sync(ctx: SyncContext, version: int) -> list[dict[str, Any]]:
    """The update through the group (built or rebuilt first when needed); on a failure in the group, this
    update goes through the object store and the group is left, to be rebuilt at the next update."""
    try:
        group_id, slots = ensure_group(ctx)
        sent = ctx.start_send(NAME, {})  # the learner's send and the replicas' receive meet in each broadcast
        # A replica Serve added since the group was built is not in `slots`: it skips this update (the
        # driver brings it up from the registry) and joins the group built at the next one.
        results = ctx.update(NAME, {"group_id": group_id, "worker_slots": slots}, version)
        stats = ray.get(sent, timeout=DRIVER_TIMEOUTS * ctx.timeout_s)[0]
    except GROUP_FAILURES as e:
        log.warning(
            "collective weight sync of version %d failed (%s: %s); this update goes through the object store "
            "and the weight group is rebuilt at the next one",
            version,
            type(e).__name__,
            e,
        )
        ctx.close()
        return [{**r, "path": "object_store_fallback"} for r in object_store.sync(ctx, version)]
    return [{**r, "bytes": stats["bytes"], "buckets": stats["buckets"]} for r in results]


def ensure_group(ctx: SyncContext) -> tuple[str, dict[str, int]]:
    """The id of a group holding learner rank 0 and exactly the live replicas' workers, building a new one
    when the current group (if any) does not; and the replicas' worker slots in it."""
    replicas = ctx.status(NAME)
    learner = ctx.learner_status(NAME)
    world_size = 1 + sum(r["workers"] for r in replicas)
    group_id = learner.get("group_id")
    in_group = all(r.get("group_id") == group_id for r in replicas)
    slots = worker_slots(replicas)
    if group_id is not None and in_group and learner["world_size"] == world_size:
        return group_id, slots
    check_distinct_devices(learner["device"], replicas)
    spec = ctx.prepare(NAME, {"world_size": world_size, "timeout_s": ctx.timeout_s})
    from lightning_ray.inference.server import InferenceServer

    ctx.on_replicas(InferenceServer.prepare_weights, NAME, {"spec": spec, "worker_slots": slots})
    log.info("weight group %s: %s, %d ranks", spec["group_id"], ctx.backend, world_size)
    return spec["group_id"], slots


def check_distinct_devices(learner_device: str | None, replicas: list[dict[str, Any]]) -> None:
    """NCCL needs one GPU per rank: learner rank 0 and a vLLM worker on one GPU need another hand-off."""
    devices = [d for d in [learner_device, *(d for r in replicas for d in r["devices"])] if d is not None]
    if len(devices) != len(set(devices)):
        raise ValueError(
            "inference.weight_sync=collective over NCCL needs learner rank 0 and every vLLM worker on distinct "
            "GPUs, but some share one (learner and vLLM co-located on a GPU): use inference.weight_sync=ipc "
            "there"
        )


PATH = WeightPath(NAME, GroupSender, GroupReceiver, sync)
