"""Serve the app with uvicorn: one process, one lifespan, one or two listeners.

uvicorn's event loop (the main thread) runs the sockets and whatever app it is given; `bootstrap.serve`
gives it the front door of adapters/inbound/pipeline_loop.py, which answers callbacks there and hands
everything else to the pipeline's own loop and thread.

Without `[SERVER] ADMIN_PORT` everything is on the main port, as always. With it, the app is served on two
sockets by one `uvicorn.Server` (so startup, graceful shutdown and signal handling are uvicorn's, once) and
requests are routed by the local port they arrived on: the public listener answers only `/webhook`,
`/healthz` and `/readyz`; the admin listener (`ADMIN_HOST`, default 127.0.0.1) everything else, and not
`/webhook`. Both listeners bound request heads in size and time (adapters/inbound/bounded_http.py).
"""

from __future__ import annotations

import logging
import socket
import sys
from dataclasses import dataclass, field
from typing import Final, Literal

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from adapters.inbound.bounded_http import HeadLimits, bounded_protocol
from adapters.inbound.config_file import Settings

log = logging.getLogger("kfdify.server")

PUBLIC_PATHS: Final = frozenset({"/webhook", "/healthz", "/readyz"})
ADMIN_ONLY_REFUSED: Final = frozenset({"/webhook"})  # the admin listener is for operators, not for WeCom
KEEP_ALIVE_S: Final = 5  # uvicorn's default: an idle kept-alive connection is closed after this
STARTUP_FAILURE: Final = 3  # uvicorn's exit code when it cannot start


@dataclass(frozen=True, slots=True)
class Listeners:
    host: str = "0.0.0.0"
    port: int = 11850
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None  # None: admin endpoints and /metrics on the main port
    head: HeadLimits = field(default_factory=HeadLimits)
    keep_alive_s: int = KEEP_ALIVE_S
    graceful_shutdown_s: int = 25
    parser: Literal["auto", "httptools", "h11"] = "auto"


def listeners_from(settings: Settings) -> Listeners:
    return Listeners(
        host=settings.host,
        port=settings.port,
        admin_host=settings.admin_host,
        admin_port=settings.admin_port,
        head=HeadLimits(max_bytes=settings.max_header_bytes, timeout_s=settings.header_timeout_s),
        graceful_shutdown_s=int(settings.shutdown_grace_s) + 5,
    )


_NOT_FOUND: Final = b'{"error":"not found"}'


async def _not_found(send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_NOT_FOUND))],
        }
    )
    await send({"type": "http.response.body", "body": _NOT_FOUND})


def split_by_port(app: ASGIApp, *, admin_port: int) -> ASGIApp:
    """Route each request by the local port it came in on: the admin port gets the operator endpoints,
    any other (the public one) only PUBLIC_PATHS. Lifespan and anything else pass straight to `app`."""

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            server = scope.get("server")
            on_admin = server is not None and server[1] == admin_port
            path = scope["path"]
            if (path in ADMIN_ONLY_REFUSED) if on_admin else (path not in PUBLIC_PATHS):
                await _not_found(send)
                return
        await app(scope, receive, send)

    return route


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening-ready sockets for every address `host` resolves to (like asyncio's create_server)."""
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in infos:
            if (family, address[0]) in seen:
                continue
            seen.add((family, address[0]))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def uvicorn_config(app: ASGIApp, listeners: Listeners) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=bounded_protocol(listeners.head, listeners.parser),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=listeners.graceful_shutdown_s,
        timeout_keep_alive=listeners.keep_alive_s,
        # h11 has its own cap on a buffered head (16 KiB by default): make it ours.
        h11_max_incomplete_event_size=listeners.head.max_bytes,
        server_header=False,
    )


def serve(app: ASGIApp, listeners: Listeners) -> None:
    """Run until SIGTERM/SIGINT (graceful shutdown as uvicorn does it); exit 3 if a port cannot be bound."""
    sockets: list[socket.socket] = []
    wanted = [(listeners.host, listeners.port, "public" if listeners.admin_port else "all endpoints")]
    if listeners.admin_port is not None:
        wanted.append((listeners.admin_host, listeners.admin_port, "admin and /metrics"))
        app = split_by_port(app, admin_port=listeners.admin_port)
    for host, port, role in wanted:
        try:
            sockets += bind(host, port)
        except OSError as exc:
            log.error("cannot listen on %s:%s (%s): %s", host, port, role, exc)
            for sock in sockets:
                sock.close()
            sys.exit(STARTUP_FAILURE)
        log.info("listening on http://%s:%s (%s)", host, port, role)
    server = uvicorn.Server(uvicorn_config(app, listeners))
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        # uvicorn shut down gracefully on Ctrl-C, then re-raised the signal; as uvicorn.run() does, end
        # quietly instead of printing a traceback for a normal stop.
        pass
    if not server.started:
        sys.exit(STARTUP_FAILURE)
