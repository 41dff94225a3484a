"""The Starlette application: every route the service answers, and nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.inbound.admin_api import AdminApi
from adapters.inbound.console_api import ConsoleApi
from adapters.inbound.openapi import openapi_document
from adapters.inbound.wecom_webhook import WeComWebhook

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[None]]


@asynccontextmanager
async def _no_lifespan(app: Starlette) -> AsyncIterator[None]:
    yield


async def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": "not found"}, status_code=404)


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": "method not allowed"}, status_code=405)


async def _server_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": "internal error"}, status_code=500)


def lifespan_for(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]) -> Lifespan:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await start()
        try:
            yield
        finally:
            await stop()

    return lifespan


def create_app(
    *,
    webhook: WeComWebhook,
    admin: AdminApi,
    metrics: Callable[[Request], Awaitable[Response]] | None = None,
    lifespan: Lifespan | None = None,
    extra_routes: list[Any] | None = None,
    version: str = "unknown",
    console: ConsoleApi | None = None,
) -> Starlette:
    guard = admin.guarded
    # Shapes only, no configuration or state: open like the health checks (on the admin listener only
    # when [SERVER] ADMIN_PORT is set: adapters/inbound/server.py).
    document = openapi_document(version=version, include_metrics=metrics is not None)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    routes = [
        Route("/webhook", webhook.verify, methods=["GET"]),
        Route("/webhook", webhook, methods=["POST"]),  # bare ASGI: see WeComWebhook.__call__
        Route("/status", guard(admin.status), methods=["GET"]),
        Route("/clear", guard(admin.clear), methods=["POST"]),
        Route("/get_conversation", guard(admin.get_conversation), methods=["GET"]),
        Route("/reset_conversation", guard(admin.reset_conversation), methods=["POST"]),
        Route("/healthz", admin.healthz, methods=["GET"]),
        Route("/readyz", admin.readyz, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    if metrics is not None:
        # Counters reveal traffic and failures: the admin token, like the admin API (Prometheus sends it
        # with `authorization: {credentials: ...}` in its scrape config).
        routes.append(Route("/metrics", guard(metrics), methods=["GET"]))
    routes.extend(extra_routes or [])
    if console is not None:  # the operator console and its admin endpoints (adapters/inbound/console_api.py)
        routes.extend(console.routes())
    return Starlette(
        routes=routes,
        lifespan=lifespan or _no_lifespan,
        exception_handlers={404: _not_found, 405: _method_not_allowed, 500: _server_error},
    )
