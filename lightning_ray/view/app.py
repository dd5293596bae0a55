"""`lightning-ray view RUN_DIR`: the live run page, a FastAPI app with Jinja2 templates and Plotly curves.

The page is one HTML document whose parts are server-rendered fragments (templates/*.html) that a few lines of
script fetch and refresh every few seconds while the run writes its files; the curves are Plotly figures
(`charts.py`) drawn by the plotly.js bundled with the plotly package, so the page needs no network.

It binds 127.0.0.1 unless told otherwise; bound anywhere else it requires a token (generated when none is
given), passed once as `?token=` (the URL printed carries it) and kept in a cookie by the browser.
"""

from __future__ import annotations

import functools
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.templating import Jinja2Templates

from lightning_ray.config.sections import is_loopback
from lightning_ray.monitor.errors import FailureKind
from lightning_ray.monitor.summary import ABANDONED
from lightning_ray.view.calls import call_views, group_rows, run_config, run_model_path, run_tokenizer
from lightning_ray.view.charts import charts
from lightning_ray.view.run_data import Filters, RunData

TEMPLATES = Path(__file__).parent / "templates"
TOKEN_COOKIE = "lightning_ray_view"
REFRESH_S = 5


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    return format(value, spec) if isinstance(value, float) else str(value)


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.filters["fmt"] = _fmt
    return templates


@functools.cache
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _parse(params: dict[str, str], name: str, kind: type) -> Any:
    value = params.get(name, "").strip()
    if not value:
        return None
    try:
        return kind(value)
    except ValueError:
        what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
        raise HTTPException(400, f"{name}: {value!r} is not {what}") from None


def filters_from(params: dict[str, str]) -> Filters:
    """The browser's filters from a query string (empty fields match everything)."""
    return Filters(
        step=_parse(params, "step", int),
        task=_parse(params, "task", str),
        min_reward=_parse(params, "min_reward", float),
        max_reward=_parse(params, "max_reward", float),
        failure=_parse(params, "failure", str),
        role=_parse(params, "role", str),
        group=_parse(params, "group", str),
    )


def create_app(run_dir: str | Path, token: str | None = None) -> FastAPI:
    """The run page of `run_dir`; with `token`, every request must carry it (query, cookie or bearer)."""
    data = RunData(run_dir)
    templates = _templates()
    app = FastAPI(title=f"lightning-ray: {data.run_dir.name}", docs_url=None, redoc_url=None)

    if token is not None:

        @app.middleware("http")
        async def require_token(request: Request, call_next: Any) -> Response:
            given = (
                request.query_params.get("token")
                or request.cookies.get(TOKEN_COOKIE)
                or request.headers.get("authorization", "").removeprefix("Bearer ")
            )
            if not secrets.compare_digest(given.encode(), token.encode()):
                return PlainTextResponse(
                    "a token is required: open the URL that `lightning-ray view` printed", 401
                )
            response = await call_next(request)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response

    def render(request: Request, name: str, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"run": data, **context})

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request) -> HTMLResponse:
        kinds = sorted([*(k.value for k in FailureKind), ABANDONED])
        return render(request, "page.html", refresh_ms=REFRESH_S * 1000, kinds=kinds)

    @app.get("/plotly.min.js")
    def plotly_js() -> Response:
        return Response(
            _plotly_js(), media_type="text/javascript", headers={"Cache-Control": "max-age=86400"}
        )

    @app.get("/api/charts")
    def chart_json() -> JSONResponse:
        return JSONResponse(charts(data.metrics()))

    @app.get("/fragments/status", response_class=HTMLResponse)
    def status(request: Request) -> HTMLResponse:
        rows = data.metrics()
        return render(request, "status.html", last=rows[-1] if rows else None, summary=data.summary())

    @app.get("/fragments/failures", response_class=HTMLResponse)
    def failures(request: Request) -> HTMLResponse:
        summary, examples = data.failures()
        return render(request, "failures.html", failures=summary, examples=examples)

    @app.get("/fragments/rollouts", response_class=HTMLResponse)
    def rollouts(request: Request) -> HTMLResponse:
        params = dict(request.query_params)
        t0 = time.perf_counter()
        page = data.page(filters_from(params), page=_parse(params, "page", int) or 1)
        return render(
            request,
            "rollouts.html",
            page=page,
            roles=data.roles(),
            took_ms=(time.perf_counter() - t0) * 1000,
        )

    @app.get("/fragments/rollout/{step}/{rollout_id}/{attempt}", response_class=HTMLResponse)
    def rollout(request: Request, step: int, rollout_id: str, attempt: int) -> HTMLResponse:
        row = data.rollout_row(step, rollout_id, attempt)
        if row is None:
            raise HTTPException(404, f"no rollout {rollout_id} (attempt {attempt}) at step {step}")
        model_path = run_model_path(data.run_dir)
        tokenizer = run_tokenizer(model_path) if model_path is not None else None
        calls = call_views(data.calls(step, rollout_id, attempt), tokenizer)
        return render(
            request, "rollout.html", step=step, rollout=row, calls=calls, decoded=tokenizer is not None
        )

    @app.get("/fragments/group/{step}/{group_id}", response_class=HTMLResponse)
    def group(request: Request, step: int, group_id: str) -> HTMLResponse:
        members = data.page(Filters(step=step, group=group_id), size=10_000).rows
        if not members:
            raise HTTPException(404, f"no group {group_id} at step {step}")
        rows = group_rows(data.group_calls(step, group_id), run_config(data.run_dir), members)
        return render(request, "group.html", step=step, group_id=group_id, members=rows)

    return app


@dataclass
class ViewServer:
    """A run page served on a thread of this process (what `train` starts beside the run)."""

    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def view_token(host: str, token: str | None) -> str | None:
    """The token the page requires: none on loopback unless given; a new one when bound elsewhere."""
    if token is None and not is_loopback(host):
        return secrets.token_urlsafe(16)
    return token


def start_view(
    run_dir: str | Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None
) -> ViewServer:
    """Serve the run page in a background thread; `port` 0 takes a free one. Returns once it accepts requests."""
    token = view_token(host, token)
    config = uvicorn.Config(
        create_app(run_dir, token), host=host, port=port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="lightning-ray-view", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the run page could not start on {host}:{port}")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return ViewServer(server, thread, page_url(host, bound, token))


def page_url(host: str, port: int, token: str | None) -> str:
    """The URL to open; a wildcard bind (0.0.0.0, ::) is shown under this machine's name."""
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
