"""adapters/inbound/server.py: which listener serves what, and the settings it is built from."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from adapters.inbound.server import listeners_from, split_by_port
from tests.support.containers import unit_settings

pytestmark = pytest.mark.anyio

PATHS = ("/webhook", "/healthz", "/readyz", "/status", "/metrics", "/openapi.json", "/get_conversation")


async def echo(request: Request) -> Response:
    return PlainTextResponse(request.url.path)


APP = Starlette(routes=[Route(path, echo) for path in PATHS])


async def served(port: int) -> dict[str, int]:
    transport = httpx.ASGITransport(app=split_by_port(APP, admin_port=9001))
    async with httpx.AsyncClient(transport=transport, base_url=f"http://kf-dify.test:{port}") as client:
        return {path: (await client.get(path)).status_code for path in PATHS}


async def test_the_public_port_serves_only_the_webhook_and_health_checks() -> None:
    answers = await served(8000)
    assert {p for p, status in answers.items() if status == 200} == {"/webhook", "/healthz", "/readyz"}
    assert set(answers.values()) == {200, 404}


async def test_the_admin_port_serves_everything_but_the_webhook() -> None:
    answers = await served(9001)
    assert {p for p, status in answers.items() if status == 404} == {"/webhook"}


def test_listeners_come_from_the_server_settings() -> None:
    settings = dataclasses.replace(
        unit_settings(), port=8000, admin_port=9001, max_header_bytes=8192, header_timeout_s=2.5
    )
    listeners = listeners_from(settings)
    assert (listeners.port, listeners.admin_host, listeners.admin_port) == (8000, "127.0.0.1", 9001)
    assert (listeners.head.max_bytes, listeners.head.timeout_s) == (8192, 2.5)
    assert listeners_from(unit_settings()).admin_port is None
