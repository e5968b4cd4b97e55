"""The aiohttp application: middlewares, health, metrics and the routes of both APIs.

:func:`create_app` builds the app around a :class:`~.state.ServerState` (in
:mod:`.state`, which the routes import too). The OpenAI and Ollama routes live in
their own modules.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from .. import __version__
from ..errors import MeLocalError
from ..logs import AccessRecord
from . import embeddings, infill, ollama, openai, tokens
from . import metrics as prom
from .errors import ApiError, from_exception
from .security import add_cors_headers, security_middleware
from .state import NOTE, STATE, AccessNote, ServerState
from .wire import ollama_error, openai_error

log = logging.getLogger("me_local.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def api_family(path: str) -> str:
    return "ollama" if path == "/" or path.startswith("/api/") else "openai"


def error_response(request: web.Request, err: ApiError) -> web.Response:
    if api_family(request.path) == "ollama":
        body = ollama_error(err.message)
    else:
        body = openai_error(err.message, err.type, err.code, err.param)
    response = web.json_response(body, status=err.status, headers=err.headers)
    if err.close:
        response.force_close()
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves in the API's own error shape; only me-local's own faults are 5xx."""
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(request, err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        reason = exc.text if exc.text and exc.status != 404 else f"{exc.reason}: {request.method} {request.path}"
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        return error_response(request, ApiError(exc.status, reason.strip(), code=code, headers=headers))
    except MeLocalError as exc:
        return error_response(request, from_exception(exc, retry_after=request.app[STATE].retry_after))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(request, ApiError(500, "internal error in me-local; see its log",
                                                code="internal_error"))


@web.middleware
async def count_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Requests by endpoint and status, and one access-log line each (no headers; the prompt only
    with --log-prompts)."""
    state = request.app[STATE]
    t0 = time.perf_counter()
    note = request[NOTE] = AccessNote()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # the client went away first (nginx's convention)
        raise
    except ConnectionResetError:
        status = 499
        raise
    finally:
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "unmatched"
        state.metrics.requests.inc(endpoint=endpoint, method=request.method, status=str(status))
        state.access.log(AccessRecord(request.method, request.path, status, time.perf_counter() - t0,
                                      prompt_tokens=note.prompt_tokens, completion_tokens=note.completion_tokens,
                                      model=note.model, client=request.remote, prompt=note.prompt))


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.status == "ready":
        return web.json_response({"status": "ok", "version": __version__,
                                  "ensembles": state.ensemble_figures()})
    body: dict[str, Any] = {"status": state.status}
    if state.status == "failed":
        body["error"] = str(state.load_error)
    return web.json_response(body, status=503, headers={"Retry-After": str(state.retry_after)})


async def metrics_route(request: web.Request) -> web.Response:
    state = request.app[STATE]
    figures = state.ensemble_figures()
    gauges = [
        prom.gauge("me_local_info", "me-local's version.", [((("version", __version__),), 1)]),
        prom.gauge("me_local_ready", "1 when the models are loaded and requests are served.",
                   [((), 1 if state.status == "ready" else 0)]),
        prom.gauge("me_local_streams_in_flight", "Generations running or waiting for a slot.",
                   [((), len(state.streams))]),
        prom.gauge("me_local_slots", "Slots (parallel) per ensemble.",
                   [((("ensemble", n),), f["slots"]) for n, f in figures.items()]),
        prom.gauge("me_local_busy_slots", "Slots generating now.",
                   [((("ensemble", n),), f["busy_slots"]) for n, f in figures.items()]),
        prom.gauge("me_local_queue_depth", "Requests waiting for a slot.",
                   [((("ensemble", n),), f["queued"]) for n, f in figures.items()]),
    ]
    return web.Response(body=state.metrics.render(gauges).encode(), headers={"Content-Type": prom.CONTENT_TYPE})


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    if state.autoload:
        state.begin_loading()
    yield
    await state.close()


async def _on_shutdown(app: web.Application) -> None:
    await app[STATE].stop_streams("shutdown")


def create_app(state: ServerState) -> web.Application:
    """The application: routes of both APIs, checks, metrics; loading starts with it."""

    app = web.Application(
        middlewares=[count_middleware, error_middleware, security_middleware(state.policy)],
        client_max_size=state.policy.max_body_bytes,
    )
    app[STATE] = state
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_route)
    openai.add_routes(app)
    ollama.add_routes(app)
    tokens.add_routes(app)
    embeddings.add_routes(app)
    infill.add_routes(app)
    app.cleanup_ctx.append(_engine_ctx)
    app.on_shutdown.append(_on_shutdown)
    app.on_response_prepare.append(add_cors_headers)
    return app
