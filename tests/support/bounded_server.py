"""`python -m tests.support.bounded_server PORT PARSER HEAD_TIMEOUT [ADMIN_PORT]`: a small app served the way
bootstrap serves the service (adapters.inbound.server.serve), with the HTTP parser chosen: tests of the
listener itself, for the parser the real service does not use (h11) as well as for httptools."""

from __future__ import annotations

import logging
import sys

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.inbound.bounded_http import HeadLimits
from adapters.inbound.server import Listeners, serve


async def echo(request: Request) -> Response:
    return JSONResponse({"path": request.url.path, "headers": len(request.headers)})


def main(argv: list[str]) -> None:
    port, parser, timeout = int(argv[0]), argv[1], float(argv[2])
    admin_port = int(argv[3]) if len(argv) > 3 else None
    assert parser in ("httptools", "h11")
    logging.basicConfig(level=logging.INFO)
    app = Starlette(
        routes=[
            Route(path, echo, methods=["GET", "POST"])
            for path in ("/healthz", "/webhook", "/status", "/metrics")
        ]
    )
    serve(
        app,
        Listeners(
            host="127.0.0.1",
            port=port,
            admin_port=admin_port,
            head=HeadLimits(timeout_s=timeout),
            graceful_shutdown_s=2,
            parser=parser,  # type: ignore[arg-type]
        ),
    )


if __name__ == "__main__":
    main(sys.argv[1:])
