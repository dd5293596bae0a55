"""What stands before the routes: the bearer token (constant-time), the request size limit, and a body that is
a JSON object of bounded depth holding only valid Unicode (a lone surrogate such as `"\\ud800"` is valid JSON
but no tokenizer can encode it)."""

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
MAX_JSON_DEPTH = 64  # nesting of arrays and objects in a request body (a tool's JSON schema needs a handful)


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON; 413 above `limit` bytes, 400 if it is not a JSON object, nests deeper than
    `MAX_JSON_DEPTH` or holds a string that is not valid Unicode."""
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
    except RecursionError:
        raise _too_deep() from None
    except ValueError as err:  # JSONDecodeError, bad UTF-8, an integer of more than 4300 digits
        raise GatewayError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    _check_values(body)
    return body


def _check_values(body: dict[str, Any]) -> None:
    """Walk the parsed body once (iteratively: depth is what is being bounded): 400 for nesting deeper than
    `MAX_JSON_DEPTH` and for a key or string that UTF-8 cannot encode, naming where it is."""
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, where)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            path = f"{where}.{key}" if where else str(key)
            if isinstance(key, str):
                _check_text(key, path)
            stack.append((item, path, depth + 1))


def _check_text(text: str, where: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        where = where.encode("utf-8", "backslashreplace").decode()  # the path may hold the bad key itself
        raise GatewayError(
            400, f"invalid unicode in '{where}': {err.reason} at position {err.start}", param=where
        ) from None


def _too_deep() -> GatewayError:
    return GatewayError(
        400, f"the request body nests more than {MAX_JSON_DEPTH} levels of arrays and objects"
    )


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
