"""The task API's HTTP routes, on the run's runners gateway (every route behind `gateway.auth_token` when set).

    POST /runners                      {"name"?}                         -> settings + "runner_id"
    POST /runners/{runner_id}/lease    {"max_n"?: 1, "wait_s"?: 0}       -> {"leases": [lease, ...]}
    POST /tasks/{lease_id}/heartbeat                                     -> {"held": bool, "expires_at"?}
    POST /tasks/{lease_id}/reward      {"value", "dims"?}                -> {"call_index"}
    POST /tasks/{lease_id}/complete    {"reward"?, "logs"?}              -> {"status", "kind", "reward", "pool"}
    POST /tasks/{lease_id}/fail        {"reason", "kind"?, "error_type"?, "traceback"?, "logs"?}  -> the same

README.md ("Remote runners") describes the fields; `desk.py` what each call does to the pool. Errors are the
gateway's JSON bodies: 400 a malformed body (naming the field), 401 the token, 404 an unknown runner or lease,
409 a lease that has ended (a second complete, a revoked lease), 503 the task pool is gone.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

from lightning_ray.config import Config
from lightning_ray.gateway.app import AddRoutes
from lightning_ray.gateway.calls import GatewayState
from lightning_ray.gateway.guards import read_json
from lightning_ray.gateway.protocol import validation_error
from lightning_ray.monitor.errors import Failure, FailureKind
from lightning_ray.rollouts.capture import MAX_CHARS
from lightning_ray.runners.desk import RunnerDesk

Number = StrictFloat | StrictInt
B = TypeVar("B", bound=BaseModel)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegisterBody(_Body):
    name: str = "runner"


class LeaseBody(_Body):
    max_n: StrictInt = Field(1, ge=1)
    wait_s: Number = Field(0, ge=0)


class RewardBody(_Body):
    value: Number
    dims: dict[str, Number] = Field(default_factory=dict)


class CompleteBody(_Body):
    reward: Number | None = None
    logs: str = ""


class FailBody(_Body):
    reason: str = Field(min_length=1)
    kind: FailureKind = FailureKind.AGENT_EXCEPTION
    error_type: str | None = None
    traceback: str = ""
    logs: str = ""


def task_routes(cfg: Config, pool: Any) -> AddRoutes:
    """What `start_gateway(add_routes=...)` takes to serve the task API of `pool` (the run's TaskPoolActor)."""
    limit = cfg.gateway.max_request_bytes

    def add(app: FastAPI, state: GatewayState, public_url: str) -> None:
        desk = RunnerDesk(cfg, pool, state.recorder, public_url, state.served_model)

        async def body(request: Request, model: type[B]) -> B:
            raw = {} if request.headers.get("content-length") == "0" else await read_json(request, limit)
            try:
                return model.model_validate(raw)
            except ValidationError as err:
                raise validation_error(err) from None

        @app.post("/runners")
        async def register(request: Request) -> dict[str, Any]:
            return await desk.register((await body(request, RegisterBody)).name)

        @app.post("/runners/{runner_id}/lease")
        async def lease(runner_id: str, request: Request) -> dict[str, Any]:
            b = await body(request, LeaseBody)
            return {"leases": await desk.lease(runner_id, b.max_n, float(b.wait_s))}

        @app.post("/tasks/{lease_id}/heartbeat")
        async def heartbeat(lease_id: str) -> dict[str, Any]:
            return await desk.heartbeat(lease_id)

        @app.post("/tasks/{lease_id}/reward")
        async def reward(lease_id: str, request: Request) -> dict[str, Any]:
            b = await body(request, RewardBody)
            return desk.emit(lease_id, float(b.value), {k: float(v) for k, v in b.dims.items()})

        @app.post("/tasks/{lease_id}/complete")
        async def complete(lease_id: str, request: Request) -> dict[str, Any]:
            b = await body(request, CompleteBody)
            returned = None if b.reward is None else float(b.reward)
            return await desk.complete(lease_id, returned, b.logs[:MAX_CHARS])

        @app.post("/tasks/{lease_id}/fail")
        async def fail(lease_id: str, request: Request) -> dict[str, Any]:
            b = await body(request, FailBody)
            failure = Failure(
                kind=b.kind.value, exc_type=b.error_type, message=b.reason, traceback=b.traceback[:MAX_CHARS]
            )
            return await desk.fail(lease_id, failure, b.logs[:MAX_CHARS])

    return add
