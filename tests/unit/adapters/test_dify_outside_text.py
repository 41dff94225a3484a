"""Dify's error messages, codes and event fields are outside text: escaped and bounded before they reach an
exception or a log line (the same helper as the WeCom adapter's errmsg)."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest

from adapters.outbound.dify import DifyChatEngine
from adapters.outbound.outside_text import escape_outside_text
from adapters.outbound.wecom_api import escape_outside_text as wecom_escape
from application.errors import ChatEngineError
from domain.chat import Question

pytestmark = pytest.mark.anyio

KEY = "app-SeCrEt-KeY-0123456789"
QUESTION = Question(user="wm-alice", query="保修期多久？")
COMMON = {"conversation_id": "c-1", "message_id": "m-1", "task_id": "t-1", "created_at": 1}
FORGED = "bad\r\n2026-12-02 INFO kfdify forged line\x1b[31m\u2028end"


def _engine(response: httpx.Response) -> tuple[DifyChatEngine, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: response))
    return DifyChatEngine(base_url="http://dify.test/v1", api_key=KEY, client=client), client


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def _one_line(text: str) -> None:
    assert "\n" not in text and "\r" not in text and "\x1b" not in text and "\u2028" not in text


def test_the_wecom_adapter_uses_the_shared_helper() -> None:
    assert wecom_escape is escape_outside_text
    assert escape_outside_text("a\nb") == "a\\nb"
    assert escape_outside_text("x" * 400).endswith("...")


async def test_an_http_error_message_and_code_are_escaped() -> None:
    body = {"code": "invalid_param\nforged", "message": FORGED + KEY}
    engine, client = _engine(httpx.Response(400, json=body))
    async with client:
        with pytest.raises(ChatEngineError) as caught:
            await engine.ask(QUESTION)
    error = caught.value
    for text in (error.message, error.code, str(error)):
        _one_line(text)
        assert KEY not in text
    assert "forged line" in error.message


async def test_a_stream_error_event_is_escaped() -> None:
    event = {"event": "error", **COMMON, "status": 400, "code": "bad_request", "message": FORGED}
    headers = {"content-type": "text/event-stream"}
    engine, client = _engine(httpx.Response(200, headers=headers, content=_sse(event)))
    async with client:
        with pytest.raises(ChatEngineError) as caught:
            await engine.ask(QUESTION)
    _one_line(caught.value.message)


async def test_the_paused_node_is_logged_on_one_line(caplog: pytest.LogCaptureFixture) -> None:
    body = _sse({"event": "message", **COMMON, "answer": "请稍候"}) + _sse(
        {"event": "human_input_required", **COMMON, "data": {"node_title": "审核\n\x1b[2Jforged"}}
    )
    headers = {"content-type": "text/event-stream"}
    engine, client = _engine(httpx.Response(200, headers=headers, content=body))
    with caplog.at_level(logging.WARNING, logger="kfdify"):
        async with client:
            answer = await engine.ask(QUESTION)
    assert answer.needs_human_input
    (record,) = [r for r in caplog.records if "paused" in r.getMessage()]
    _one_line(record.getMessage())
