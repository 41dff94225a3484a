"""Answer files come from Dify's origin or a listed host, never from an internal address (issue #13, 1).

A Dify answer names its files by URL, and the URL is the model's (or a tool's) choice. Before: any http(s)
URL was downloaded, redirects followed anywhere, and the bytes sent to the customer; a file "at" a loopback
or LAN server was fetched. Here an "internal" server logs every request it gets: it must get none.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from adapters.outbound.dify import DifyChatEngine
from application.errors import ChatEngineError
from tests.support import media_samples
from tests.support.dify_server import Fault
from tests.support.http_server import serve
from tests.support.stack import KF, Servers, Stack, fake_servers, make_settings, running

pytestmark = pytest.mark.anyio
MB = 1024 * 1024
KEY = "app-file-origin-key"


@dataclass
class Internal:
    """A loopback HTTP server that answers every path with a PNG and logs the paths asked for."""

    url: str = ""
    port: int = 0
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def internal() -> Iterator[Internal]:
    server = Internal()
    image = media_samples.png(rgb=(1, 2, 3))

    async def anything(request: Request) -> Response:
        server.requests.append(request.url.path)
        return Response(image, media_type="image/png")

    with serve(Starlette(routes=[Route("/{path:path}", anything)])) as url:
        server.url, server.port = url, int(url.rsplit(":", 1)[1])
        yield server


@pytest.fixture
def servers() -> Iterator[Servers]:
    with fake_servers() as s:
        yield s


@pytest.fixture
async def stack(servers: Servers) -> AsyncIterator[Stack]:
    async with running(make_settings(servers, interim_after_s=0.0), servers) as s:
        yield s


async def test_a_file_on_an_internal_server_is_never_requested_and_the_text_still_arrives(
    stack: Stack, internal: Internal
) -> None:
    stack.dify.inject(
        Fault(
            files=(
                ("image", f"{internal.url}/latest/meta-data/iam.png"),
                ("image", f"http://localhost:{internal.port}/admin.png"),
            )
        )
    )
    stack.wecom.world.add_customer_text(KF, "wmSsrf", "给我看图")

    assert (await stack.callback()).status_code == 200
    await stack.settle(30)

    assert internal.requests == []
    assert stack.replies_to("wmSsrf")[0] == "答：给我看图"
    assert stack.wecom.world.sent_media == []


async def test_dify_own_origin_on_loopback_is_fetched(servers: Servers) -> None:
    image = media_samples.png(rgb=(9, 9, 9))
    path = servers.dify.host_file(image, "image/png", "png")
    engine = DifyChatEngine(base_url=servers.dify_url, api_key=servers.dify.api_key)
    try:
        blob = await engine.fetch_file(servers.dify_url.removesuffix("/v1") + path, max_bytes=MB)
    finally:
        await engine.aclose()

    assert blob.data == image


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_a_listed_host_at_a_loopback_address_is_refused(
    servers: Servers, internal: Internal, host: str
) -> None:
    engine = DifyChatEngine(
        base_url=servers.dify_url, api_key=servers.dify.api_key, file_hosts=(f"{host}:{internal.port}",)
    )
    try:
        with pytest.raises(ChatEngineError):
            await engine.fetch_file(f"http://{host}:{internal.port}/x.png", max_bytes=MB)
    finally:
        await engine.aclose()

    assert internal.requests == []


@pytest.mark.parametrize(
    "host", ["0x7f000001", "2130706433", "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]", "[::1]"]
)
async def test_loopback_in_any_spelling_is_refused(servers: Servers, internal: Internal, host: str) -> None:
    engine = DifyChatEngine(
        base_url=servers.dify_url, api_key=servers.dify.api_key, file_hosts=(f"{host}:{internal.port}",)
    )
    try:
        with pytest.raises(ChatEngineError):
            await engine.fetch_file(f"http://{host}:{internal.port}/x.png", max_bytes=MB)
    finally:
        await engine.aclose()

    assert internal.requests == []


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://100.100.100.200/latest/meta-data/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://10.1.2.3/",
        "http://192.168.1.1/",
    ],
)
async def test_metadata_private_unspecified_and_multicast_addresses_are_refused_even_when_listed(
    servers: Servers, url: str
) -> None:
    host = url.split("/")[2]
    engine = DifyChatEngine(base_url=servers.dify_url, api_key=servers.dify.api_key, file_hosts=(host,))
    try:
        with pytest.raises(ChatEngineError) as caught:
            await engine.fetch_file(url, max_bytes=MB)
    finally:
        await engine.aclose()
    assert caught.value.code == "file_url_refused"  # refused before any connection attempt


@pytest.fixture
def redirecting_dify(internal: Internal) -> Iterator[str]:
    """A Dify origin whose file URLs redirect: inside its origin, or to the internal server."""
    image = media_samples.png(rgb=(4, 5, 6))

    async def files(request: Request) -> Response:
        name = request.path_params["name"]
        if name == "away.png":
            return RedirectResponse(f"{internal.url}/stolen.png", status_code=302)
        if name == "away-by-name.png":
            return RedirectResponse(f"http://localhost:{internal.port}/stolen.png", status_code=307)
        if name == "moved.png":
            return RedirectResponse("/files/tools/real.png?sign=1", status_code=301)
        if name == "loop.png":
            return RedirectResponse("/files/tools/loop.png", status_code=302)
        return Response(image, media_type="image/png")

    with serve(Starlette(routes=[Route("/files/tools/{name}", files)])) as url:
        yield url


@pytest.mark.parametrize("name", ["away.png", "away-by-name.png"])
async def test_a_redirect_from_dify_to_a_foreign_host_is_refused(
    redirecting_dify: str, internal: Internal, name: str
) -> None:
    engine = DifyChatEngine(base_url=f"{redirecting_dify}/v1", api_key=KEY)
    try:
        with pytest.raises(ChatEngineError) as caught:
            await engine.fetch_file(f"{redirecting_dify}/files/tools/{name}", max_bytes=MB)
    finally:
        await engine.aclose()

    assert caught.value.code == "file_url_refused"
    assert internal.requests == []


async def test_redirects_inside_dify_origin_are_followed_a_few_times(redirecting_dify: str) -> None:
    engine = DifyChatEngine(base_url=f"{redirecting_dify}/v1", api_key=KEY)
    try:
        blob = await engine.fetch_file(f"{redirecting_dify}/files/tools/moved.png", max_bytes=MB)
        with pytest.raises(ChatEngineError, match="redirects more than"):
            await engine.fetch_file(f"{redirecting_dify}/files/tools/loop.png", max_bytes=MB)
    finally:
        await engine.aclose()

    assert blob.data == media_samples.png(rgb=(4, 5, 6))
    assert blob.filename == "real.png"
