"""Naming conversations under a burst: a few at once, every one named, a repeated refusal logged once."""

from __future__ import annotations

import asyncio
import logging

import pytest

from adapters.outbound.fake_dify import FakeChatEngine
from application import conversation_names
from application.conversation_names import MAX_NAMINGS_AT_ONCE, ConversationNamer
from application.errors import ChatEngineError
from application.options import ReplyTexts
from application.routing import KfRoute
from application.telemetry import Telemetry
from domain.chat import Answer, Question
from domain.messages import InboundMessage, Origin

pytestmark = pytest.mark.anyio

KF = "wkKF1"


def text(customer: str) -> InboundMessage:
    return InboundMessage(
        msgid=f"m-{customer}",
        open_kfid=KF,
        external_userid=customer,
        send_time=1_700_000_000,
        origin=Origin.CUSTOMER,
        msgtype="text",
        text="你好",
    )


class SlowNamingEngine(FakeChatEngine):
    """Names a conversation only when the test lets it; tracks how many namings are under way at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.under_way = 0
        self.most_at_once = 0

    async def name_conversation(self, conversation_id: str, *, user: str, name: str) -> None:
        self.under_way += 1
        self.most_at_once = max(self.most_at_once, self.under_way)
        try:
            await self.gate.wait()
            await super().name_conversation(conversation_id, user=user, name=name)
        finally:
            self.under_way -= 1


async def _answers(engine: FakeChatEngine, customers: list[str]) -> list[Answer]:
    return [await engine.ask(Question(user=f"kf-{KF}-{c}", query="你好")) for c in customers]


async def test_a_burst_of_new_conversations_is_named_a_few_at_a_time_and_all_of_them() -> None:
    engine = SlowNamingEngine()
    customers = [f"wm{n:03d}" for n in range(30)]
    answers = await _answers(engine, customers)
    telemetry = Telemetry()
    namer = ConversationNamer(profiles=None, telemetry=telemetry)
    route = KfRoute("default", engine, ReplyTexts())

    for customer, answer in zip(customers, answers, strict=True):
        namer.started(text(customer), route, answer)
    while engine.under_way < MAX_NAMINGS_AT_ONCE:
        await asyncio.sleep(0)
    assert engine.under_way == MAX_NAMINGS_AT_ONCE  # the others wait their turn
    engine.gate.set()
    await namer.idle()

    assert engine.most_at_once == MAX_NAMINGS_AT_ONCE
    assert len(engine.conversation_names) == len(customers)
    assert telemetry.counters["conversations_named"] == len(customers)


async def test_the_same_refusal_is_logged_at_info_once(caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeChatEngine()
    answers = await _answers(engine, ["wmA", "wmB", "wmC"])
    telemetry = Telemetry()
    namer = ConversationNamer(profiles=None, telemetry=telemetry)
    route = KfRoute("default", engine, ReplyTexts())
    caplog.set_level(logging.DEBUG, logger="kfdify.names")

    for customer, answer in zip(["wmA", "wmB", "wmC"], answers, strict=True):
        engine.fail_next_media("name_conversation", ChatEngineError("not_found", "gone", status=404))
        namer.started(text(customer), route, answer)
        await namer.idle()

    levels = [r.levelno for r in caplog.records if "conversation not named (not_found)" in r.getMessage()]
    assert levels == [logging.INFO, logging.DEBUG, logging.DEBUG]
    assert telemetry.labelled["dify_errors"] == {"not_found": 3}


async def test_beyond_the_pending_bound_new_conversations_stay_unnamed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(conversation_names, "MAX_NAMINGS_PENDING", 2)
    engine = SlowNamingEngine()
    customers = ["wmA", "wmB", "wmC"]
    answers = await _answers(engine, customers)
    telemetry = Telemetry()
    namer = ConversationNamer(profiles=None, telemetry=telemetry)
    route = KfRoute("default", engine, ReplyTexts())

    for customer, answer in zip(customers, answers, strict=True):
        namer.started(text(customer), route, answer)
    engine.gate.set()
    await namer.idle()

    assert len(engine.conversation_names) == 2
    assert telemetry.counters["conversations_not_named"] == 1
