"""The outbound adapters on uvloop, the event loop uvicorn picks when it is installed (a dependency).

uvloop's transports implement asyncio's interfaces without subclassing them: code that checks
`isinstance(transport, asyncio.Transport)` works on the stdlib loop and breaks on uvloop.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from adapters.outbound.dify import DifyChatEngine
from adapters.outbound.memcached_store import MemcachedStateStore
from domain.chat import Question
from domain.dedupe import DedupeKey
from domain.messages import CustomerRef, InboundMessage, Origin
from tests.support.dify_server import FakeDifyHost, FakeDifyServer
from tests.support.http_server import serve
from tests.support.memcached import MemcachedProcess

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not run on Windows"),
]
KEY = "app-uvloop"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture
def dify_url() -> Iterator[str]:
    host = FakeDifyHost()
    host.server = FakeDifyServer(api_key=KEY)
    with serve(host) as url:
        yield url + "/v1"


async def test_runs_on_uvloop() -> None:
    import asyncio

    import uvloop

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


@pytest.mark.memcached
async def test_the_memcached_store_works_on_uvloop(memcached: MemcachedProcess) -> None:
    store = MemcachedStateStore(servers=[memcached.server])
    try:
        key = DedupeKey("wkUv", "msg1")
        assert await store.begin(key, owner="a", lease_s=5)
        assert not await store.begin(key, owner="b", lease_s=5)
        await store.finish(key)
        customer = CustomerRef("wkUv", "wmUv")
        message = InboundMessage(
            msgid="m2",
            open_kfid="wkUv",
            external_userid="wmUv",
            send_time=1,
            origin=Origin.CUSTOMER,
            msgtype="text",
            text="hi",
        )
        await store.record([message])
        assert [m.msgid for m in await store.pending(customer)] == ["m2"]
        await store.set_cursor("wkUv", "c1")
        assert await store.get_cursor("wkUv") == "c1"
    finally:
        await store.aclose()


async def test_the_dify_adapter_streams_an_answer_on_uvloop(dify_url: str) -> None:
    engine = DifyChatEngine(base_url=dify_url, api_key=KEY)
    try:
        first = await engine.ask(Question(user="u1", query="你好"))
        second = await engine.ask(Question(user="u1", query="again", conversation_id=first.conversation_id))
        assert first.text and second.conversation_id == first.conversation_id
    finally:
        await engine.aclose()
