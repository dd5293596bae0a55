"""The interface every weight path implements, and what all paths share.

A path is three small pieces, one per process that takes part in an update, collected in a `WeightPath`:

* a `Sender` in learner rank 0 (`LearnerWorker` keeps one per path, through `WeightSenders`): every learner
  rank gathers the full HF-named weights (a collective under ZeRO-3) and rank 0 hands them to `send`;
* a `Receiver` in every vLLM worker (`WeightReceiverExtension` keeps one per path): `receive` yields the
  tensors, which the extension loads in place (`lightning_ray.weights.receiver`);
* `sync`, run by the driver: it asks the replicas' status, starts the learner's send and the replicas'
  `update_weights` in the order the path needs, and returns one result per replica.

What is the same for every path lives in one place each: the drain gate, the version bump and the prefix-cache
reset in `InferenceServer.update_weights` (lightning_ray/inference/server.py); the load, the re-tie of tied
embeddings and the CPU `lm_head` re-pack in `receiver.load_in_place`; the gather in
`lightning_ray.learner.export.gather_hf_state_dict`.

vLLM workers are numbered across all replicas (`worker_slots`): a replica's workers take consecutive indices
from its slot on, in replica-id order, so a path can address every worker (a rank of a process group, one set
of shared-memory handles) with a plain integer.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import ray
import torch

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from lightning_ray.learner.group import LearnerGroup

Backend = Literal["gloo", "nccl"]
Tensors = Iterator[tuple[str, torch.Tensor]]
# The driver waits this many per-operation timeouts for one update (drain, then the transfer) before it gives
# up; every rank's own operations fail after one timeout, so this only guards the unforeseen.
DRIVER_TIMEOUTS = 3
log = logging.getLogger(__name__)


class Sender(abc.ABC):
    """Learner rank 0's side of a path. `device` and `copy` say how the learners gather the weights for it:
    `copy=False` lets tensors already on `device` share the live parameters' storage (ZeRO 0-2), for a
    sender that is done with them before the learner can step again."""

    copy = True

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def status(self) -> dict[str, Any]:
        """Path state the driver checks before an update (e.g. the process group rank 0 hosts)."""
        return {}

    def prepare(self, request: dict[str, Any]) -> Any:
        """Before the transfer (e.g. host a process group's rendezvous); returns what the replicas need."""
        return None

    @abc.abstractmethod
    def send(self, state: dict[str, torch.Tensor], request: dict[str, Any]) -> Any:
        """Move `state` (or make it reachable); returns the replicas' payload or transfer stats."""

    def release(self) -> None:
        """After every replica loaded the update, or failed to: drop what `send` kept alive."""
        return None  # most paths keep nothing alive after `send`

    def close(self) -> None:
        """Leave whatever the path holds open between updates."""
        self.release()


class Receiver(abc.ABC):
    """A vLLM worker's side of a path; `worker` is the vLLM worker object (rank, device, model runner)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def status(self) -> dict[str, Any]:
        """Path state the driver checks before an update (e.g. the process group this worker is in)."""
        return {}

    def prepare(self, request: dict[str, Any], replica: str) -> Any:
        """Before the transfer, as a worker of `replica` (e.g. join a process group)."""
        return None

    @abc.abstractmethod
    def receive(self, payload: Any, replica: str) -> Tensors:
        """The update's HF-named tensors, in order; the caller exhausts the iterator."""

    def close(self) -> None:
        """Leave whatever the path holds open between updates."""
        return None  # most paths hold nothing open


@contextlib.asynccontextmanager
async def as_is(payload: Any, tag: str) -> AsyncIterator[Any]:
    """The replica's part of most paths: hand the payload to its workers unchanged."""
    yield payload


@dataclass(frozen=True)
class WeightPath:
    """One way weights travel; `lightning_ray.weights.PATHS` lists them by `inference.weight_sync` name.

    `stage(payload, tag)` runs in the replica around its workers' `receive`: an async context manager that
    turns the driver's payload into the workers' (the object store path writes the state to shared memory
    there and removes it after)."""

    name: str
    sender: type[Sender]
    receiver: type[Receiver]
    sync: Callable[[SyncContext, int], list[dict[str, Any]]]
    stage: Callable[[Any, str], contextlib.AbstractAsyncContextManager[Any]] = field(default=as_is)


@dataclass
class SyncContext:
    """What the driver's side of a path works with."""

    learners: LearnerGroup
    replicas: DeploymentHandle
    backend: Backend
    timeout_s: float

    def on_replicas(
        self, method: Callable[..., Any], *args: Any, timeout_s: float | None = None
    ) -> list[Any]:
        """Call an `InferenceServer` method on every replica (passed as the method itself, so a rename fails
        at import, not at run time); one result per replica."""
        timeout = timeout_s if timeout_s is not None else DRIVER_TIMEOUTS * self.timeout_s
        return self.replicas.broadcast(method.__name__, *args).results(timeout_s=timeout)

    def status(self, path: str) -> list[dict[str, Any]]:
        """Every replica's node, vLLM worker count, their GPUs under `backend`, and the path's state."""
        from lightning_ray.inference.server import InferenceServer

        return self.on_replicas(InferenceServer.weight_status, path, self.backend, timeout_s=self.timeout_s)

    def update(self, path: str, payload: Any, version: int) -> list[dict[str, Any]]:
        """Every live replica loads the update; one lost on the way is left out (see `recovery.converge`)."""
        from lightning_ray.weights.recovery import update_surviving

        return update_surviving(self.replicas, path, payload, version, DRIVER_TIMEOUTS * self.timeout_s)

    # Learner rank 0 holds the senders; every rank takes part in a send (the gathers are collective under ZeRO-3).

    @property
    def rank0(self) -> Any:
        return self.learners.workers[0]

    def on_rank0(self, method: str, *args: Any) -> Any:
        """One call on learner rank 0; its death or the deadline is the group's `LearnerFailed`."""
        ref = getattr(self.rank0, method).remote(*args)
        return self.learners.wait(method, [ref], self.timeout_s)[0]

    def learner_status(self, path: str) -> dict[str, Any]:
        """Rank 0's Ray node, its GPU under `backend`, and the path's state."""
        return self.on_rank0("weights_status", path, self.backend)

    def prepare(self, path: str, request: dict[str, Any]) -> Any:
        return self.on_rank0("prepare_weights", path, self.backend, request)

    def start_send(self, path: str, request: dict[str, Any]) -> list[ray.ObjectRef]:
        """Every rank gathers, rank 0 sends; rank 0's ref resolves to the sender's result."""
        return [w.send_weights.remote(path, self.backend, request) for w in self.learners.workers]

    def send(self, path: str, request: dict[str, Any]) -> Any:
        """A dead rank stops the group (`LearnerFailed`) rather than leave the others in a collective."""
        return self.learners.wait(
            "send_weights", self.start_send(path, request), DRIVER_TIMEOUTS * self.timeout_s
        )[0]

    def release(self, path: str) -> None:
        self.on_rank0("release_weights", path)

    def close(self) -> None:
        """Every side leaves what its paths hold open (best effort: a side that is gone has left already)."""
        from lightning_ray.inference.server import InferenceServer

        try:
            ray.get(self.rank0.close_weights.remote(), timeout=DRIVER_TIMEOUTS * self.timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as e:
            log.warning("learner rank 0 could not close its weight paths: %s", e)
        try:
            self.replicas.broadcast(InferenceServer.close_weights.__name__).results(
                timeout_s=self.timeout_s, return_exceptions=True
            )
        except TimeoutError as e:
            log.warning("replicas did not close their weight paths in %.0f s: %s", self.timeout_s, e)


def update_replicas(
    replicas: DeploymentHandle,
    path: str,
    payload: Any,
    version: int,
    timeout_s: float | None = None,
    *,
    if_older: bool = False,
    return_exceptions: bool = False,
) -> list[Any]:
    """Every replica loads `payload` of `path` behind its drain gate and serves `version` afterwards (with
    `if_older`, only those serving an older version; the others answer `skipped`). With `return_exceptions`
    a replica's failure is its entry in the list instead of raised."""
    from lightning_ray.inference.server import InferenceServer

    response = replicas.broadcast(InferenceServer.update_weights.__name__, path, payload, version, if_older)
    results = response.results(timeout_s=timeout_s, return_exceptions=return_exceptions)
    return [r if isinstance(r, BaseException) else {**r, "path": path} for r in results]


def worker_slots(replicas: list[dict[str, Any]]) -> dict[str, int]:
    """Each replica's first worker index across all replicas, in replica-id order (see the module docstring)."""
    slots, next_index = {}, 0
    for r in sorted(replicas, key=lambda r: r["replica"]):
        slots[r["replica"]] = next_index
        next_index += r["workers"]
    return slots


def worker_index(slots: dict[str, int], replica: str, rank: int) -> int:
    """The index of worker `rank` of `replica`; a replica that started after the update was planned has none."""
    if replica not in slots:
        raise RuntimeError(
            f"replica {replica} was not counted when this weight update was planned (it started in the "
            "meantime); the next update includes it"
        )
    return slots[replica] + rank


def transfer_device(backend: Backend) -> torch.device:
    """Where a rank's buffers live: the current GPU for NCCL, host memory for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def device_identity(backend: Backend) -> str | None:
    """The physical GPU this process would use (its UUID) under NCCL; None under gloo. Paths that need two
    processes on distinct GPUs (NCCL) or on the same one (CUDA IPC) compare these."""
    if backend != "nccl":
        return None
    return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


def expect_exhausted(stream: Tensors) -> None:
    """Read what a consumer left unread (so a process group stays in step), then report the unread names."""
    left = [name for name, _ in stream]
    if left:
        raise RuntimeError(f"the weight update held {len(left)} tensors the model did not load: {left[:5]}")
