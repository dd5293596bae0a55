"""The inference service as the gateway sees it: a Ray Serve handle, sticky per rollout, errors as HTTP codes.

Roles in `rollout.frozen_agents` are served by a second deployment of the same model at its starting weights
(`FROZEN_APP_NAME`, which never receives a weight broadcast); every other role by the live, trained policy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from lightning_ray.gateway.protocol import GatewayError
from lightning_ray.inference.server import APP_NAME, FROZEN_APP_NAME, inference_handle

_UNAVAILABLE = (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)


def engine_error(err: Exception) -> GatewayError:
    """503 when the service cannot take the request now, 502 when the engine failed on it."""
    if isinstance(err, _UNAVAILABLE):
        return GatewayError(503, f"inference service unavailable: {type(err).__name__}: {_first_line(err)}")
    cause = err.cause if isinstance(err, RayTaskError) and err.cause is not None else err
    return GatewayError(502, f"inference engine failed: {type(cause).__name__}: {_first_line(cause)}")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:500] if lines else ""


class Engine:
    """Calls `InferenceServer` through a handle; `session_id=rollout_id` keeps a rollout on one replica.

    handle: the live policy's deployment; looked up by name (`APP_NAME`) when omitted.
    frozen_agents: roles whose calls go to `frozen_handle` instead, looked up by name (`FROZEN_APP_NAME`) when
        omitted and `frozen_agents` is not empty.
    """

    def __init__(
        self,
        handle: Any | None = None,
        *,
        frozen_agents: Iterable[str] = (),
        frozen_handle: Any | None = None,
    ):
        self.handle = handle if handle is not None else inference_handle(APP_NAME)
        self.frozen_agents = frozenset(frozen_agents)
        if self.frozen_agents and frozen_handle is None:
            frozen_handle = inference_handle(FROZEN_APP_NAME)
        self.frozen_handle = frozen_handle

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
        self, rollout_id: str, prompt_ids: list[int], sampling: dict[str, Any], role: str | None = None
    ) -> dict[str, Any]:
        handle = self.handle_for(role).options(session_id=rollout_id)
        try:
            return await handle.generate.remote(prompt_ids, sampling)
        except Exception as err:
            raise engine_error(err) from err

    def stream(
        self, rollout_id: str, prompt_ids: list[int], sampling: dict[str, Any], role: str | None = None
    ) -> EngineStream:
        handle = self.handle_for(role).options(session_id=rollout_id, stream=True)
        return EngineStream(handle.generate_stream.remote(prompt_ids, sampling))


async def _model_info(handle: Any) -> dict[str, Any]:
    try:
        return await handle.model_info.remote()
    except Exception as err:
        raise engine_error(err) from err


class EngineStream:
    """Deltas of one streamed generation; engine errors surface as `GatewayError`, `cancel()` aborts it."""

    def __init__(self, generator: Any):
        self._generator = generator

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return await self._generator.__anext__()
        except StopAsyncIteration:
            raise
        except Exception as err:
            raise engine_error(err) from err

    def cancel(self) -> None:
        self._generator.cancel()
