"""HTTP routes of the gateway (FastAPI).

    /rollout/{rollout_id}/v1/chat/completions            POST, `stream: true` too
    /rollout/{rollout_id}/v1/completions                 POST, `stream: true` too
    /rollout/{rollout_id}/v1/models[/{model}]            GET
    /rollout/{rollout_id}/agent/{role}/v1/...            the same, calls recorded under agent `role`
    /rollouts  POST, /rollouts/{rollout_id}  GET|DELETE  management (standalone `lightning-ray serve` only)
    /runners, /tasks/...                                 the remote runners' task API (`lightning_ray.runners`)
    /health                                              GET, no auth

Errors are OpenAI-style JSON bodies. With a bearer token configured, every route but /health needs it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lightning_ray.agent.urls import ROUTE_PREFIXES, rollout_url
from lightning_ray.gateway.calls import (
    Call,
    GatewayState,
    Generation,
    generate,
    prepare_chat,
    prepare_completion,
    record,
    reply_for,
    unknown_rollout,
)
from lightning_ray.gateway.engine import EngineStream
from lightning_ray.gateway.guards import BearerAuth, read_json
from lightning_ray.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GatewayError,
    validation_error,
)
from lightning_ray.gateway.recorder import UnknownRollout
from lightning_ray.gateway.render import IncrementalDecoder
from lightning_ray.gateway.responses import (
    POLICY_VERSION_HEADER,
    ChatFormatter,
    CompletionFormatter,
    Formatter,
)
from lightning_ray.gateway.tools import load_parser_class

M = TypeVar("M", bound=BaseModel)
AddRoutes = Callable[[FastAPI, GatewayState, str], None]  # (app, state, public_url)


def create_app(
    state: GatewayState,
    *,
    public_url: str,
    auth_token: str | None = None,
    max_request_bytes: int = 4 * 1024 * 1024,
    manage_rollouts: bool = False,
    add_routes: AddRoutes | None = None,
) -> FastAPI:
    """The gateway app. `public_url` is how callers reach it (used in `POST /rollouts` answers). `add_routes`
    adds routes of another API (the remote runners' task API, `lightning_ray.runners`), behind the same token
    and error handling."""
    app = FastAPI(title="lightning-ray gateway", docs_url=None, redoc_url=None, openapi_url=None)
    if auth_token:
        app.add_middleware(BearerAuth, token=auth_token)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    async def chat(request: Request):
        rollout_id, role = _route(request)
        _require_open(state, rollout_id)
        req = _validate(ChatCompletionRequest, await read_json(request, max_request_bytes))
        if req.tools:
            await _load_tool_parser(state.tool_parser)
        call = prepare_chat(state, rollout_id, role, req)
        return await _respond(
            state, call, ChatFormatter(call, state.tokenizer), req.stream, req.include_usage()
        )

    async def completions(request: Request):
        rollout_id, role = _route(request)
        _require_open(state, rollout_id)
        req = _validate(CompletionRequest, await read_json(request, max_request_bytes))
        call = prepare_completion(state, rollout_id, role, req)
        return await _respond(
            state, call, CompletionFormatter(call, state.tokenizer), req.stream, req.include_usage()
        )

    async def models(request: Request) -> dict[str, Any]:
        _require_open(state, _route(request)[0])
        return {"object": "list", "data": [_model_card(state)]}

    async def model(request: Request) -> dict[str, Any]:
        _require_open(state, _route(request)[0])
        name = request.path_params["model"]
        if name != state.served_model:
            raise GatewayError(
                404, f"model {name[:64]!r} is not served here", param="model", code="model_not_found"
            )
        return _model_card(state)

    for prefix in ROUTE_PREFIXES:
        # Plain Starlette routes: every agent call takes these, and they need none of FastAPI's dependency
        # solving or response-model handling (they read the body and answer with a Response themselves).
        app.router.add_route(f"{prefix}/v1/chat/completions", chat, methods=["POST"])
        app.router.add_route(f"{prefix}/v1/completions", completions, methods=["POST"])
        app.add_api_route(f"{prefix}/v1/models", models, methods=["GET"])
        app.add_api_route(f"{prefix}/v1/models/{{model:path}}", model, methods=["GET"])

    if manage_rollouts:
        _add_management_routes(app, state, public_url)
    if add_routes is not None:
        add_routes(app, state, public_url)
    return app


def _add_management_routes(app: FastAPI, state: GatewayState, public_url: str) -> None:
    @app.post("/rollouts")
    async def open_rollout() -> dict[str, str]:
        rollout_id = secrets.token_urlsafe(16)
        state.recorder.open(rollout_id)
        return {"rollout_id": rollout_id, "base_url": rollout_url(public_url, rollout_id)}

    @app.get("/rollouts/{rollout_id}")
    async def get_rollout(rollout_id: str) -> dict[str, Any]:
        try:
            transitions = state.recorder.transitions(rollout_id)
        except UnknownRollout:
            raise unknown_rollout(rollout_id) from None
        return {"rollout_id": rollout_id, "transitions": [t.to_dict() for t in transitions]}

    @app.delete("/rollouts/{rollout_id}")
    async def close_rollout(rollout_id: str) -> dict[str, Any]:
        try:
            transitions = state.recorder.close(rollout_id)
        except UnknownRollout:
            raise unknown_rollout(rollout_id) from None
        return {"rollout_id": rollout_id, "transitions": [t.to_dict() for t in transitions]}


async def _respond(state: GatewayState, call: Call, fmt: Formatter, stream: bool, include_usage: bool):
    if not stream:
        gen = await generate(state, call)
        reply = reply_for(state, call, record(state, call, gen))
        return JSONResponse(
            fmt.body(gen, reply),
            headers={POLICY_VERSION_HEADER: str(gen.policy_version)},
        )
    deltas = state.engine.stream(
        call.rollout_id, call.prompt.ids, call.sampling, role=call.role, priority=call.priority
    )
    try:
        first = await anext(deltas)  # engine errors become a status code, not a broken stream
    except StopAsyncIteration:
        first = None
    except BaseException:
        deltas.cancel()
        raise
    version = first["policy_version"] if first else -1
    return StreamingResponse(
        _events(state, call, fmt, deltas, first, include_usage),
        media_type="text/event-stream",
        headers={POLICY_VERSION_HEADER: str(version), "Cache-Control": "no-cache"},
    )


async def _events(
    state: GatewayState,
    call: Call,
    fmt: Formatter,
    deltas: EngineStream,
    first: dict[str, Any] | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE events of one streamed call: the call is recorded before its final chunk goes out."""
    gen, decoder, done = Generation(), IncrementalDecoder(state.tokenizer), False
    streamer = call.tools.streamer() if call.tools is not None else None
    gen.policy_version = first["policy_version"] if first is not None else -1
    try:
        for chunk in fmt.opening_chunks(gen.policy_version):
            yield chunk
        delta = first
        while delta is not None:
            gen.add(delta)
            ids = delta["response_ids"]
            text = decoder.push(ids) + (decoder.finish() if gen.finish_reason else "")
            if streamer is not None:
                text = streamer.push(text)
            if text or (call.logprobs and ids):
                yield fmt.chunk(text, ids, delta["response_logprobs"], delta["policy_version"])
            if gen.finish_reason:
                break
            try:
                delta = await anext(deltas)
            except StopAsyncIteration:
                delta = None
            except GatewayError as err:
                yield fmt.error_event(err.body())
                return
        if not gen.finish_reason:
            yield fmt.error_event(
                GatewayError(502, "the inference stream ended without a finish reason").body()
            )
            return
        text = record(state, call, gen)  # == decoder.text: the same as a non-streamed call
        done = True
        reply = reply_for(state, call, text)
        if streamer is not None:
            rest = streamer.rest(reply)
            if rest:
                yield fmt.chunk(rest, [], [], gen.policy_version)
            if reply.tool_calls:
                yield fmt.tool_calls_chunk(reply.tool_calls, gen.policy_version)
        yield fmt.final_chunk(gen, reply.finish_reason_override)
        if include_usage:
            yield fmt.usage_chunk(gen)
        yield fmt.done()
    finally:
        if not done:
            deltas.cancel()


async def _load_tool_parser(name: str) -> None:
    """Import the configured tool parser (the first use imports vLLM's parsers, off the event loop); a request
    with tools on a gateway whose parser vLLM does not know is refused, naming it."""
    try:
        await asyncio.to_thread(load_parser_class, name)
    except ValueError as err:
        raise GatewayError(400, f"tools cannot be used on this gateway: {err}", param="tools") from None


def _route(request: Request) -> tuple[str, str | None]:
    return request.path_params["rollout_id"], request.path_params.get("role")


def _require_open(state: GatewayState, rollout_id: str) -> None:
    if not state.recorder.is_open(rollout_id):
        raise unknown_rollout(rollout_id)


def _model_card(state: GatewayState) -> dict[str, Any]:
    return {
        "id": state.served_model,
        "object": "model",
        "created": state.created,
        "owned_by": "lightning-ray",
        "max_model_len": state.max_model_len,
    }


def _validate(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise validation_error(err) from None


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, err: GatewayError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = "no such route" if err.status_code == 404 else str(err.detail)
        return JSONResponse(GatewayError(err.status_code, message).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, err: Exception) -> JSONResponse:
        """A bug, not the request's fault: still an OpenAI-style JSON body, never a bare text page."""
        body = GatewayError(500, f"internal gateway error: {type(err).__name__}").body()
        return JSONResponse(body, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def request_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            GatewayError(400, f"invalid request: {err.errors()[0]['msg']}").body(), status_code=400
        )
