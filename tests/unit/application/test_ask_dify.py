"""The Dify question loop on its own: the customer's conversation, one restart when Dify lost it, retries
only where a retry can help."""

from __future__ import annotations

import pytest

from adapters.outbound.fake_dify import FakeChatEngine
from adapters.outbound.memory_store import MemoryStateStore
from application.ask_dify import AskDify, trace_id
from application.errors import ChatEngineError, ConversationGone
from application.media_port import PreparedQuestion
from application.options import BotOptions, ReplyTexts
from application.routing import KfRoute
from application.telemetry import Telemetry
from domain.conversation import Conversation
from domain.messages import InboundMessage, Origin
from tests.support.containers import FakeClock

pytestmark = pytest.mark.anyio

MESSAGE = InboundMessage(
    msgid="msg/1 é",
    open_kfid="wkAsk",
    external_userid="wmAsk",
    send_time=1_700_000_000,
    origin=Origin.CUSTOMER,
    msgtype="text",
    text="hello",
)
QUESTION = PreparedQuestion(query="hello")


class Setup:
    def __init__(self, *, retries: int = 1) -> None:
        self.engine = FakeChatEngine()
        self.store = MemoryStateStore()
        self.clock = FakeClock(1_700_000_100)
        self.telemetry = Telemetry()
        options = BotOptions(dify_retries=retries, dify_retry_delay_s=0.0)
        self.ask = AskDify(
            conversations=self.store, clock=self.clock, options=options, telemetry=self.telemetry
        )
        self.route = KfRoute(name="default", engine=self.engine, texts=ReplyTexts())

    async def remember(self, conversation_id: str) -> None:
        now = self.clock.now()
        await self.store.put_conversation(MESSAGE.customer, Conversation.started(conversation_id, now=now))


async def test_the_answer_continues_the_customers_conversation() -> None:
    s = Setup()
    first = await s.ask(MESSAGE, s.route, QUESTION)
    second = await s.ask(MESSAGE, s.route, QUESTION)

    assert first.answer.conversation_id == second.answer.conversation_id
    assert [q.conversation_id for q in s.engine.questions] == [None, first.answer.conversation_id]
    assert [q.trace_id for q in s.engine.questions] == ["msg_1__"] * 2 == [trace_id(MESSAGE)] * 2
    stored = await s.store.get_conversation(MESSAGE.customer)
    assert stored is not None and stored.turns == 2


async def test_a_lost_conversation_is_restarted_once() -> None:
    s = Setup(retries=0)
    await s.remember("gone-id")
    s.engine.fail_next(ConversationGone("Conversation Not Exists."))

    asked = await s.ask(MESSAGE, s.route, QUESTION)

    assert [q.conversation_id for q in s.engine.questions] == ["gone-id", None]
    assert s.telemetry.counters["conversations_restarted"] == 1
    stored = await s.store.get_conversation(MESSAGE.customer)
    assert stored is not None and stored.conversation_id == asked.answer.conversation_id != "gone-id"


async def test_a_new_conversation_refused_is_a_failure_not_a_loop() -> None:
    s = Setup()
    await s.remember("gone-id")
    s.engine.fail_next(ConversationGone("gone"), times=2)

    with pytest.raises(ChatEngineError) as failure:
        await s.ask(MESSAGE, s.route, QUESTION)

    assert failure.value.code == "conversation_gone"
    assert len(s.engine.questions) == 2


async def test_a_transient_failure_is_retried_within_the_budget() -> None:
    s = Setup(retries=1)
    s.engine.fail_next(ChatEngineError("too_many_requests", status=429, retryable=True))

    asked = await s.ask(MESSAGE, s.route, QUESTION)

    assert asked.answer.text and len(s.engine.questions) == 2
    assert s.telemetry.labelled["dify_errors"] == {"too_many_requests": 1}


async def test_retries_stop_when_the_budget_is_spent() -> None:
    s = Setup(retries=1)
    s.engine.fail_next(ChatEngineError("http_502", status=502, retryable=True), times=2)

    with pytest.raises(ChatEngineError) as failure:
        await s.ask(MESSAGE, s.route, QUESTION)

    assert failure.value.code == "http_502" and len(s.engine.questions) == 2


@pytest.mark.parametrize("code", ["timeout", "idle_timeout", "invalid_param"])
async def test_timeouts_and_permanent_failures_are_not_retried(code: str) -> None:
    s = Setup(retries=3)
    s.engine.fail_next(ChatEngineError(code, retryable=code != "invalid_param"))

    with pytest.raises(ChatEngineError) as failure:
        await s.ask(MESSAGE, s.route, QUESTION)

    assert failure.value.code == code and len(s.engine.questions) == 1
    assert await s.store.get_conversation(MESSAGE.customer) is None
