"""Run the gateway: as a sidecar in the caller's event loop, or on an event loop in a thread of its own.

    gw = await start_gateway(cfg)                       # in a rollout worker's asyncio loop
    gw.open_rollout(rollout_id)                         # rollout_id = secrets.token_urlsafe(16)
    llm_url = gw.base_url(rollout_id)                   # give the agent this and gw.api_key
    transitions = gw.close_rollout(rollout_id)          # list[Transition], in call order
    await gw.stop()

uvicorn serves on a socket bound here (so a port in use is an exception, not a process exit) and never touches
signal handlers or logging configuration of the host process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from transformers import PreTrainedTokenizerBase

from lightning_ray.agent.urls import rollout_url
from lightning_ray.config import (
    Config,
    GatewayConfig,
    SamplingConfig,
    is_loopback,
    resolve_path,
)
from lightning_ray.data.schema import Transition
from lightning_ray.gateway.app import AddRoutes, create_app
from lightning_ray.gateway.calls import GatewayState
from lightning_ray.gateway.engine import Engine
from lightning_ray.gateway.recorder import Recorder
from lightning_ray.gateway.render import load_chat_template, load_tokenizer
from lightning_ray.gateway.tools import DEFAULT_TOOL_PARSER
from lightning_ray.names import frozen_app, inference_app


class _Server(uvicorn.Server):
    """uvicorn without signal capture: the host process (a Ray actor, the CLI) owns its signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Gateway:
    """A running gateway. `url` is its root (`http://127.0.0.1:PORT`); agents get `base_url(rollout_id)`."""

    url: str
    state: GatewayState
    auth_token: str | None = field(repr=False)
    _server: _Server
    _task: asyncio.Task
    _thread: threading.Thread | None = field(default=None, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)

    @property
    def api_key(self) -> str:
        """What an OpenAI client passes as `api_key`: the bearer token, or a placeholder when none is needed."""
        return self.auth_token or "EMPTY"

    @property
    def served_model(self) -> str:
        return self.state.served_model

    def base_url(self, rollout_id: str, role: str | None = None) -> str:
        """The OpenAI base URL of one rollout (and agent role), see `lightning_ray.agent.urls`."""
        return rollout_url(self.url, rollout_id, role)

    def open_rollout(self, rollout_id: str, priority: int = 0) -> None:
        """Start recording calls under `rollout_id` (make it unguessable: `secrets.token_urlsafe(16)`). Its
        calls reach the engine with `priority`, which an engine with `inference.scheduling: oldest_group`
        schedules by (lower first)."""
        self.state.recorder.open(rollout_id, priority)

    def close_rollout(self, rollout_id: str) -> list[Transition]:
        """Stop accepting calls for the rollout and return its transitions in call order. A call still running
        when the rollout closes is not recorded. Raises `UnknownRollout` for an id that is not open."""
        return self.state.recorder.close(rollout_id)

    def transitions(self, rollout_id: str) -> list[Transition]:
        """The transitions recorded so far, without closing the rollout."""
        return self.state.recorder.transitions(rollout_id)

    async def stop(self) -> None:
        """Stop serving (in-flight requests get a few seconds to finish)."""
        self._server.should_exit = True
        await self._task

    def stop_sync(self) -> None:
        """Stop a gateway from `start_gateway_thread` (from any thread but its own)."""
        if self._loop is None or self._thread is None:
            raise RuntimeError(
                "stop_sync is for gateways started with start_gateway_thread; await stop() instead"
            )
        asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


async def start_gateway(
    config: Config | GatewayConfig | None = None,
    *,
    handle: Any | None = None,
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    chat_template: str | Path | None = None,
    sampling: SamplingConfig | dict[str, Any] | None = None,
    manage_rollouts: bool = False,
    tool_parser: str | None = None,
    frozen_handle: Any | None = None,
    add_routes: AddRoutes | None = None,
) -> Gateway:
    """Start a gateway in the running event loop; returns once it accepts connections.

    config: a whole `Config` (gateway section, sampling defaults `inference.sampling`, `model.chat_template` and
        `rollout.frozen_agents` are taken from it) or just a `GatewayConfig` (host, port, auth_token,
        max_request_bytes).
    handle: the InferenceServer deployment handle; looked up by name when omitted (needs Ray and Serve up).
    frozen_handle: the frozen snapshot's deployment that serves the roles in `rollout.frozen_agents`; looked up
        by name (`names.frozen_app`) when omitted and the config names frozen roles.
    tokenizer: a tokenizer or its folder; default: the engine's `model_dir`.
    chat_template: a Jinja file replacing the tokenizer's template (overrides the config's).
    sampling: defaults for the `SamplingConfig` settings a request leaves out.
    manage_rollouts: also serve `POST /rollouts`, `GET|DELETE /rollouts/{id}` (standalone `serve`).
    tool_parser: vLLM tool-call parser for requests with tools (overrides `model.tool_parser`; default
        "hermes", see `tools.py`).
    add_routes: adds another API's routes to the app (`create_app`).
    """
    gw_cfg, sampling, chat_template = _settings(config, sampling, chat_template)
    if tool_parser is None and isinstance(config, Config):
        tool_parser = config.model.tool_parser
    token = gw_cfg.token()
    if not is_loopback(gw_cfg.host) and not token:
        raise ValueError(f"gateway.host={gw_cfg.host!r} is not loopback: set gateway.auth_token")
    if isinstance(config, Config):  # the run's own apps (`lightning_ray.names`)
        engine = Engine(
            handle,
            frozen_agents=config.rollout.frozen_agents,
            frozen_handle=frozen_handle,
            retries=config.inference.request_retries,
            app_name=inference_app(config),
            frozen_app_name=frozen_app(config),
        )
    else:
        engine = Engine(handle, frozen_handle=frozen_handle)
    info = await engine.model_info()
    tok = tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else None
    if tok is None:
        tok = await asyncio.to_thread(load_tokenizer, tokenizer or info["model_dir"])
    state = GatewayState(
        tokenizer=tok,
        engine=engine,
        recorder=Recorder(),
        served_model=info["model"],
        max_model_len=int(info["max_model_len"]),
        chat_template=load_chat_template(chat_template),
        tool_parser=tool_parser or DEFAULT_TOOL_PARSER,
        sampling_defaults=_sampling_defaults(sampling),
    )
    sock = _bind(gw_cfg.host, gw_cfg.port)
    url = f"http://{_url_host(gw_cfg.host)}:{sock.getsockname()[1]}"
    app = create_app(
        state,
        public_url=url,
        auth_token=token,
        max_request_bytes=gw_cfg.max_request_bytes,
        manage_rollouts=manage_rollouts,
        add_routes=add_routes,
    )
    server = _Server(
        uvicorn.Config(
            app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]), name="lightning-ray-gateway")
    while not server.started:
        if task.done():
            sock.close()
            task.result()
            raise RuntimeError("the gateway stopped while starting")
        await asyncio.sleep(0.01)
    return Gateway(url=url, state=state, auth_token=token, _server=server, _task=task)


def start_gateway_thread(*args: Any, **kwargs: Any) -> Gateway:
    """`start_gateway` on an event loop in a daemon thread of its own, for callers that block (sync agent
    code, tests with the sync OpenAI client). Same arguments; stop it with `gateway.stop_sync()`."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="lightning-ray-gateway", daemon=True)
    thread.start()
    try:
        gateway = asyncio.run_coroutine_threadsafe(start_gateway(*args, **kwargs), loop).result()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        raise
    gateway._thread, gateway._loop = thread, loop
    return gateway


def _settings(
    config: Config | GatewayConfig | None,
    sampling: SamplingConfig | dict[str, Any] | None,
    chat_template: str | Path | None,
) -> tuple[GatewayConfig, SamplingConfig | dict[str, Any] | None, str | Path | None]:
    if isinstance(config, Config):
        if chat_template is None and config.model.chat_template is not None:
            base = Path(config.source).parent if config.source else Path.cwd()
            chat_template = resolve_path(config.model.chat_template, base)
        return config.gateway, sampling if sampling is not None else config.inference.sampling, chat_template
    return config or GatewayConfig(), sampling, chat_template


def _sampling_defaults(sampling: SamplingConfig | dict[str, Any] | None) -> dict[str, Any]:
    if sampling is None:
        return {}
    values = sampling.model_dump() if isinstance(sampling, SamplingConfig) else dict(sampling)
    unknown = set(values) - set(SamplingConfig.model_fields)
    if unknown:
        raise ValueError(
            f"unknown sampling defaults: {sorted(unknown)}; known: {list(SamplingConfig.model_fields)}"
        )
    return values


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Connections accepted here inherit it. asyncio sets it on its own only when the socket's proto is
        # IPPROTO_TCP; without it every answer (headers, then body) waits ~40 ms on the client's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _url_host(host: str) -> str:
    """A host name callers can reach: a wildcard bind is advertised by this node's IP."""
    if host in ("0.0.0.0", "::", ""):
        host = _node_ip()
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    return host


def _node_ip() -> str:
    import ray

    if ray.is_initialized():
        return ray.util.get_node_ip_address()
    return socket.gethostbyname(socket.gethostname())
