"""`DifyChatEngine.suggested` and the `/parameters` switches, against the local Dify server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from adapters.outbound.dify import DifyChatEngine
from application.errors import ChatEngineError
from domain.chat import Question
from tests.support.dify_server import FakeDifyServer
from tests.support.http_server import serve

pytestmark = pytest.mark.anyio


@pytest.fixture
async def dify(anyio_backend: str) -> AsyncIterator[tuple[FakeDifyServer, DifyChatEngine]]:
    server = FakeDifyServer()
    with serve(server.app) as url:
        engine = DifyChatEngine(base_url=f"{url}/v1", api_key=server.api_key, total_timeout=10)
        try:
            yield server, engine
        finally:
            await engine.aclose()


async def test_a_message_id_that_is_no_id_is_refused_without_a_request(
    dify: tuple[FakeDifyServer, DifyChatEngine],
) -> None:
    server, engine = dify
    for bad in ("", "../parameters", "a/b", "x" * 65, "a?b"):
        with pytest.raises(ChatEngineError) as caught:
            await engine.suggested("wm-a", bad)
        assert caught.value.code == "invalid_param"
    assert not [r for r in server.requests if "suggested" in r.path]


async def test_the_user_goes_in_the_query_and_no_url_is_kept_per_message(
    dify: tuple[FakeDifyServer, DifyChatEngine],
) -> None:
    server, engine = dify
    server.suggest = lambda query, answer: ["下一步呢？", "还有吗？"]
    answer = await engine.ask(Question(user="wm-a", query="你好"))

    assert await engine.suggested("wm-a", answer.message_id) == ["下一步呢？", "还有吗？"]
    [request] = [r for r in server.requests if r.path.endswith("/suggested")]
    assert request.query["user"] == "wm-a"
    assert not any("suggested" in path for path in engine._urls)


async def test_a_moderated_app_says_so(dify: tuple[FakeDifyServer, DifyChatEngine]) -> None:
    server, engine = dify
    server.moderation = True
    assert (await engine.parameters()).moderation_enabled is True
    assert engine.streams_answers is True
