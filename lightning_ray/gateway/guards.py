"""What stands before the routes: the bearer token (constant-time) and the request size limit."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from lightning_ray.gateway.protocol import GatewayError

OPEN_PATHS = frozenset({"/health"})
DRAIN_LIMIT = (
    64 * 1024 * 1024
)  # an oversize body is read (and dropped) up to this, so the client sees the 413


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON; 413 above `limit` bytes, 400 if it is not a JSON object."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_LIMIT:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > DRAIN_LIMIT:
            break
    if size > limit:
        raise _too_large(limit)
    try:
        body = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GatewayError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    return body


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


class BearerAuth:
    """Pure ASGI middleware: `Authorization: Bearer <token>` on every route but /health, compared in constant
    time (on digests, so not even the token's length leaks)."""

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self.digest = hashlib.sha256(token.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        err = GatewayError(
            401, "missing or invalid bearer token (Authorization: Bearer <gateway.auth_token>)"
        )
        response = JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, value = header.partition(b" ")
        offered = hashlib.sha256(value.strip()).digest()
        return scheme.lower() == b"bearer" and hmac.compare_digest(offered, self.digest)
