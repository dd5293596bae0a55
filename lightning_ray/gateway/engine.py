"""The inference service as the gateway sees it: a Ray Serve handle, sticky per rollout, errors as HTTP codes.

A call whose replica is lost before it answers (its actor died, or its vLLM engine did; Serve replaces it) is
sent again, up to `inference.request_retries` times: a streamed call only while nothing of it was streamed.
The failed attempt leaves nothing behind (calls are recorded from the answer only, with the policy version
the answering replica reported). After the retries the call fails with 503 `inference_replica_lost`.

Calls go to the replica over Serve's gRPC channel (`_by_reference=False`), not as Ray actor calls whose answers
pass through the object store: the answers are small (ids and log-probs), and the channel costs about half the
caller's and the replica's CPU per call (`benchmarks/serve_transport.py`). A replica lost on it surfaces as the
same `RayActorError` (Serve maps the channel's UNAVAILABLE to `ActorUnavailableError`), so the retries hold. A
request is its prompt ids: 128k of them pickle to 0.4 MB, under the replica's 4 MB message limit
(`RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH`).

Roles in `rollout.frozen_agents` are served by a second deployment of the same model at its starting weights
(`FROZEN_APP_NAME`, which never receives a weight broadcast); every other role by the live, trained policy.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from lightning_ray.config import InferenceConfig
from lightning_ray.faults import first_line
from lightning_ray.gateway.protocol import GatewayError
from lightning_ray.inference.replicas import own_loop
from lightning_ray.inference.server import APP_NAME, FROZEN_APP_NAME, inference_handle
from lightning_ray.monitor.errors import REPLICA_LOST_CODE
from lightning_ray.weights.recovery import replica_lost

_UNAVAILABLE = (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)
DEFAULT_RETRIES = InferenceConfig.model_fields["request_retries"].default
log = logging.getLogger(__name__)


def engine_error(err: Exception) -> GatewayError:
    """503 when the service cannot take the request now, 502 when the engine failed on it."""
    if isinstance(err, _UNAVAILABLE):
        return GatewayError(503, f"inference service unavailable: {type(err).__name__}: {_first_line(err)}")
    cause = err.cause if isinstance(err, RayTaskError) and err.cause is not None else err
    return GatewayError(502, f"inference engine failed: {type(cause).__name__}: {_first_line(cause)}")


def lost_error(err: Exception, attempts: int) -> GatewayError:
    """The call's replica was lost on each of its `attempts`."""
    return GatewayError(
        503,
        f"the inference replica was lost on each of {attempts} attempts (inference.request_retries="
        f"{attempts - 1}); last: {first_line(err)}",
        code=REPLICA_LOST_CODE,
    )


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:500] if lines else ""


def over_grpc(handle: Any) -> Any:
    """`handle`, calling its replicas over Serve's gRPC channel instead of as actor calls, from a router on a
    loop of its own (`own_loop`: a handle that came through Ray arrives not yet initialized)."""
    return own_loop(handle).options(_by_reference=False)


class Engine:
    """Calls `InferenceServer` through a handle; `session_id=rollout_id` keeps a rollout on one replica.

    handle: the live policy's deployment; looked up by name (`app_name`) when omitted.
    frozen_agents: roles whose calls go to `frozen_handle` instead, looked up by name (`frozen_app_name`) when
        omitted and `frozen_agents` is not empty.
    retries: how often a call whose replica was lost is sent again (`inference.request_retries`).
    """

    def __init__(
        self,
        handle: Any | None = None,
        *,
        frozen_agents: Iterable[str] = (),
        frozen_handle: Any | None = None,
        retries: int = DEFAULT_RETRIES,
        app_name: str = APP_NAME,
        frozen_app_name: str = FROZEN_APP_NAME,
    ):
        self.retries = retries
        self.handle = over_grpc(handle if handle is not None else inference_handle(app_name))
        self.frozen_agents = frozenset(frozen_agents)
        if self.frozen_agents and frozen_handle is None:
            frozen_handle = inference_handle(frozen_app_name)
        self.frozen_handle = over_grpc(frozen_handle) if frozen_handle is not None else None

    def handle_for(self, role: str | None) -> Any:
        """The deployment that serves `role`: the frozen snapshot for a frozen role, else the live policy."""
        return self.frozen_handle if role in self.frozen_agents else self.handle

    async def model_info(self) -> dict[str, Any]:
        """What the live deployment serves; with frozen roles, checks the snapshot serves the same model."""
        info = await _model_info(self.handle)
        if self.frozen_agents:
            frozen = await _model_info(self.frozen_handle)
            if (frozen["model"], frozen["model_dir"]) != (info["model"], info["model_dir"]):
                raise GatewayError(
                    503,
                    f"the frozen deployment serves {frozen['model_dir']}, the live one {info['model_dir']}: "
                    "rollout.frozen_agents needs a snapshot of the same model",
                )
        return info

    async def generate(
        self,
        rollout_id: str,
        prompt_ids: list[int],
        sampling: dict[str, Any],
        role: str | None = None,
        priority: int = 0,
    ) -> dict[str, Any]:
        handle = self.handle_for(role).options(session_id=rollout_id)
        attempt = 1
        while True:
            try:
                return await handle.generate.remote(prompt_ids, sampling, priority)
            except Exception as err:
                retry_or_raise(err, attempt, self.retries, rollout_id)
            attempt += 1

    def stream(
        self,
        rollout_id: str,
        prompt_ids: list[int],
        sampling: dict[str, Any],
        role: str | None = None,
        priority: int = 0,
    ) -> EngineStream:
        handle = self.handle_for(role).options(session_id=rollout_id, stream=True)
        return EngineStream(
            lambda: handle.generate_stream.remote(prompt_ids, sampling, priority), self.retries, rollout_id
        )


def retry_or_raise(err: Exception, attempt: int, retries: int, rollout_id: str) -> None:
    """Return (after a warning) when the call may go again: its replica was lost and `attempt` was not the
    last; otherwise raise the call's `GatewayError`."""
    if not replica_lost(err):
        raise engine_error(err) from err
    if attempt > retries:
        raise lost_error(err, attempt) from err
    log.warning(
        "rollout %s: replica lost on attempt %d, sending the call again: %s",
        rollout_id,
        attempt,
        first_line(err),
    )


async def _model_info(handle: Any) -> dict[str, Any]:
    try:
        return await handle.model_info.remote()
    except Exception as err:
        raise engine_error(err) from err


class EngineStream:
    """Deltas of one streamed generation; engine errors surface as `GatewayError`, `cancel()` aborts it.

    `start` opens the generation; it is opened again, up to `retries` times, when its replica is lost before
    the first delta came (nothing was streamed to the agent yet); a loss after that fails the call."""

    def __init__(self, start: Callable[[], Any], retries: int = DEFAULT_RETRIES, rollout_id: str = ""):
        self._start, self._retries, self._rollout_id = start, retries, rollout_id
        self._generator = start()
        self._attempt, self._streamed = 1, False

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while True:
            try:
                delta = await self._generator.__anext__()
            except StopAsyncIteration:
                raise
            except Exception as err:
                if self._streamed:
                    raise engine_error(err) from err
                retry_or_raise(err, self._attempt, self._retries, self._rollout_id)
                self._generator.cancel()
                self._generator, self._attempt = self._start(), self._attempt + 1
                continue
            self._streamed = True
            return delta

    def cancel(self) -> None:
        self._generator.cancel()
