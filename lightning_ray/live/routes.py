"""The live gateway's own routes, next to the OpenAI and rollout routes of `lightning-ray serve`:

    POST /rollouts/{rollout_id}/reward   {"value": number}   -> {"rollout_id", "policy_version", "grouped"}
    GET  /live                                              -> counts: open, opened, groups, extras, rewarded, ...

Errors are the gateway's JSON bodies: 400 a malformed body (naming the field), 404 a rollout never opened here,
409 one that has ended (rewarded already, or dropped at `live.reward_deadline_s`) or has no call yet.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, ValidationError

from lightning_ray.gateway.app import AddRoutes
from lightning_ray.gateway.calls import GatewayState
from lightning_ray.gateway.guards import read_json
from lightning_ray.gateway.protocol import validation_error
from lightning_ray.live.desk import LiveDesk


class RewardBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: StrictFloat | StrictInt


def live_routes(desk: LiveDesk, max_request_bytes: int) -> AddRoutes:
    """What `start_gateway(add_routes=...)` takes: the routes, and the desk attached to the gateway's state."""

    def add(app: FastAPI, state: GatewayState, public_url: str) -> None:
        desk.attach(state)

        @app.post("/rollouts/{rollout_id}/reward")
        async def reward(rollout_id: str, request: Request) -> dict[str, Any]:
            try:
                body = RewardBody.model_validate(await read_json(request, max_request_bytes))
            except ValidationError as err:
                raise validation_error(err) from None
            return await desk.reward(rollout_id, float(body.value))

        @app.get("/live")
        async def live() -> dict[str, Any]:
            return desk.stats()

    return add
