"""Which answer-file URLs and addresses the fetcher accepts (adapters/outbound/file_fetch.py)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from adapters.outbound.file_fetch import (
    AnswerFileFetcher,
    FileUrlRefused,
    ip_literal,
    is_public_address,
    parse_file_hosts,
)
from application.errors import ChatEngineError, MediaTooLarge
from tests.support.http_server import serve

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
        ("[fe80::1%eth0]", "fe80::1"),
        ("169.254.169.254.", "169.254.169.254"),
    ],
)
def test_ip_literals_are_recognised_in_any_spelling(host: str, address: str) -> None:
    assert ip_literal(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize("host", ["example.com", "cafe", "dify.internal", "", "1.2.3.4.5"])
def test_names_are_not_ip_literals(host: str) -> None:
    assert ip_literal(host) is None


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "::1", "10.0.0.1", "172.16.0.1", "192.168.0.1", "100.64.0.1", "100.100.100.200",
        "169.254.169.254", "fd00:ec2::254", "fe80::1", "0.0.0.0", "::", "224.0.0.1", "ff02::1",
        "255.255.255.255", "240.0.0.1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::7f00:1",
        "2002:7f00:1::1", "198.18.0.1",
    ],
)  # fmt: skip
def test_internal_addresses_are_not_public(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_internet_addresses_are_public(address: str) -> None:
    assert is_public_address(address)


def test_file_hosts_are_parsed_as_host_or_host_port() -> None:
    assert parse_file_hosts(
        ["cdn.Example.com", " oss.example:8443 ", "[2606:4700::1]:443", "", "bücher.de"]
    ) == {
        ("cdn.example.com", None),
        ("oss.example", 8443),
        ("2606:4700::1", 443),
        ("xn--bcher-kva.de", None),
    }


@pytest.mark.parametrize(
    "entry", ["http://cdn.example", "cdn.example/path", "user@cdn", "cdn:0", "cdn:x", "[::1"]
)
def test_a_malformed_file_host_is_a_configuration_error(entry: str) -> None:
    with pytest.raises(ValueError, match="FILE_HOSTS"):
        parse_file_hosts([entry])


def _fetcher(*hosts: str) -> AnswerFileFetcher:
    return AnswerFileFetcher(dify_base_url="http://dify.lan:8080/v1", file_hosts=hosts)


@pytest.mark.parametrize(
    "url",
    [
        "http://dify.lan:8080/files/tools/a.png?sign=1",
        "http://DIFY.lan:8080/files/a.png",
        "https://cdn.example.com/a.png",
        "http://cdn.example.com/a.png",
        "https://oss.example:8443/a.png",
    ],
)
def test_dify_origin_and_listed_hosts_are_accepted(url: str) -> None:
    _fetcher("cdn.example.com", "oss.example:8443").check(httpx.URL(url))


@pytest.mark.parametrize(
    "url",
    [
        "https://dify.lan:8080/a.png",  # another scheme: another origin
        "http://dify.lan/a.png",  # another port
        "http://evil.example/a.png",
        "https://cdn.example.com:8443/a.png",  # listed without a port: the default one only
        "https://oss.example/a.png",  # listed with its port only
        "ftp://cdn.example.com/a.png",
        "https://user:pw@cdn.example.com/a.png",
    ],
)
def test_other_origins_are_refused(url: str) -> None:
    with pytest.raises(FileUrlRefused):
        _fetcher("cdn.example.com", "oss.example:8443").check(httpx.URL(url))


def test_dify_origin_is_trusted_whatever_its_address() -> None:
    AnswerFileFetcher(dify_base_url="http://127.0.0.1:5001/v1").check(httpx.URL("http://127.0.0.1:5001/f"))
    AnswerFileFetcher(dify_base_url="http://[::1]/v1").check(httpx.URL("http://[::1]:80/f"))


class _ScriptedResolver(AbstractResolver):
    """Answers each lookup with the next address of a script (a rebinding DNS server)."""

    def __init__(self, *answers: list[str]) -> None:
        self._answers = list(answers)
        self.lookups = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = self._answers[min(self.lookups, len(self._answers) - 1)]
        self.lookups += 1
        return [
            ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET, proto=0, flags=0)
            for a in addresses
        ]

    async def close(self) -> None:
        return None


@pytest.fixture
def internal() -> Iterator[tuple[int, list[str]]]:
    requests: list[str] = []

    async def anything(request: Request) -> Response:
        requests.append(request.url.path)
        return Response(b"\x89PNG internal", media_type="image/png")

    with serve(Starlette(routes=[Route("/{path:path}", anything)])) as url:
        yield int(url.rsplit(":", 1)[1]), requests


async def test_a_listed_name_that_resolves_to_loopback_at_connect_time_is_not_connected(
    internal: tuple[int, list[str]],
) -> None:
    port, requests = internal
    resolver = _ScriptedResolver(["127.0.0.1"])
    fetcher = AnswerFileFetcher(
        dify_base_url="https://dify.example/v1", file_hosts=(f"files.example.com:{port}",), resolver=resolver
    )
    try:
        with pytest.raises(ChatEngineError):
            await fetcher.fetch(f"http://files.example.com:{port}/a.png", max_bytes=1024)
    finally:
        await fetcher.aclose()

    assert resolver.lookups == 1 and fetcher.resolver.refused == 1
    assert requests == []


async def test_only_the_public_addresses_of_a_mixed_answer_are_used() -> None:
    resolver = _ScriptedResolver(["127.0.0.1", "93.184.216.34", "10.0.0.7"])
    fetcher = AnswerFileFetcher(dify_base_url="https://dify.example/v1", resolver=resolver)

    found = await fetcher.resolver.resolve("files.example.com", 443)

    assert [entry["host"] for entry in found] == ["93.184.216.34"]


async def test_a_rebinding_name_is_checked_at_every_lookup() -> None:
    resolver = _ScriptedResolver(["93.184.216.34"], ["127.0.0.1"])
    fetcher = AnswerFileFetcher(dify_base_url="https://dify.example/v1", resolver=resolver)

    assert [e["host"] for e in await fetcher.resolver.resolve("files.example.com", 443)] == ["93.184.216.34"]
    with pytest.raises(OSError):
        await fetcher.resolver.resolve("files.example.com", 443)


async def test_difys_own_host_resolves_to_any_address() -> None:
    resolver = _ScriptedResolver(["10.0.0.5"])
    fetcher = AnswerFileFetcher(dify_base_url="http://dify.lan:8080/v1", resolver=resolver)

    found = await fetcher.resolver.resolve("dify.lan", 8080)

    assert [entry["host"] for entry in found] == ["10.0.0.5"]


async def test_a_body_past_max_bytes_is_cut_even_without_a_declared_length() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"x" * 600
        yield b"x" * 600

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chunks())

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    fetcher = AnswerFileFetcher(dify_base_url="http://dify.test/v1", client=client)
    async with client:
        with pytest.raises(MediaTooLarge):
            await fetcher.fetch("http://dify.test/files/a.bin", max_bytes=1000)
