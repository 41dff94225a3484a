"""The bare baseline: a Starlette app whose POST /webhook only reads the body and answers "success".

Served exactly as bootstrap.serve() serves the service (one uvicorn worker, same loop/http "auto", no
access log, no server header), so the webhook ratio isolates what kf-dify adds per callback.

    python -m bench.baseline_app --port P
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from bench.common import HOST, UVICORN_SETTINGS


async def webhook(request: Request) -> Response:
    await request.body()
    return PlainTextResponse("success")


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


app = Starlette(
    routes=[Route("/webhook", webhook, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])]
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_app")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(app, host=HOST, port=args.port, **UVICORN_SETTINGS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
