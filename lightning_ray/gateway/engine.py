"""The inference service as the gateway sees it: a Ray Serve handle, sticky per rollout, errors as HTTP codes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from lightning_ray.gateway.protocol import GatewayError
from lightning_ray.inference.server import APP_NAME, DEPLOYMENT_NAME

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
    """Calls `InferenceServer` through a handle; `session_id=rollout_id` keeps a rollout on one replica."""

    def __init__(self, handle: Any | None = None):
        self.handle = (
            handle if handle is not None else serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
        )

    async def model_info(self) -> dict[str, Any]:
        try:
            return await self.handle.model_info.remote()
        except Exception as err:
            raise engine_error(err) from err

    async def generate(
        self, rollout_id: str, prompt_ids: list[int], sampling: dict[str, Any]
    ) -> dict[str, Any]:
        try:
            return await self.handle.options(session_id=rollout_id).generate.remote(prompt_ids, sampling)
        except Exception as err:
            raise engine_error(err) from err

    def stream(self, rollout_id: str, prompt_ids: list[int], sampling: dict[str, Any]) -> EngineStream:
        handle = self.handle.options(session_id=rollout_id, stream=True)
        return EngineStream(handle.generate_stream.remote(prompt_ids, sampling))


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
