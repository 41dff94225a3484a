"""AskDify with the adaptive limiter and the retry policy: refusals (429, 503) are asked again with backoff
until the deadline, an exhausted quota is reported once and not asked during its cooldown, every Dify app
has its own limit. A fake clock; the waits between attempts advance it instead of sleeping."""

from __future__ import annotations

import asyncio
import logging

import pytest

from adapters.outbound.fake_dify import FakeChatEngine
from adapters.outbound.memory_store import MemoryStateStore
from application.ask_dify import AskDify, limiter_settings, retry_settings
from application.concurrency import AdaptiveLimiter, LimiterSettings
from application.dify_retry import RetryPolicy
from application.errors import ChatEngineError
from application.media_port import PreparedQuestion
from application.options import BotOptions, ReplyTexts
from application.routing import KfRoute
from application.telemetry import Telemetry
from domain.messages import InboundMessage, Origin
from tests.support.containers import FakeClock

pytestmark = pytest.mark.anyio

QUESTION = PreparedQuestion(query="hello")
TOO_MANY = ChatEngineError("too_many_requests", "Too many requests.", status=429, retryable=True)
UNAVAILABLE = ChatEngineError("http_503", "Service Unavailable", status=503, retryable=True)
DAILY_QUOTA = ChatEngineError(
    "rate_limit_error", "You have reached the daily limit of this app.", status=429, retryable=True
)


def message(customer: str = "wmLimit", msgid: str = "m1") -> InboundMessage:
    return InboundMessage(
        msgid=msgid,
        open_kfid="wkLimit",
        external_userid=customer,
        send_time=1_700_000_000,
        origin=Origin.CUSTOMER,
        msgtype="text",
        text="hello",
    )


class Setup:
    def __init__(self, *, limiter: AdaptiveLimiter | None = None, **options: object) -> None:
        self.engine = FakeChatEngine()
        self.clock = FakeClock(1_700_000_100)
        self.telemetry = Telemetry()
        self.options = BotOptions(**({"dify_retries": 0} | options))  # type: ignore[arg-type]
        self.slept: list[float] = []
        self.limiter = limiter or AdaptiveLimiter(clock=self.clock, settings=limiter_settings(self.options))
        self.retry = RetryPolicy(clock=self.clock, settings=retry_settings(self.options), rng=lambda: 0.5)
        self.ask = AskDify(
            conversations=MemoryStateStore(),
            clock=self.clock,
            options=self.options,
            telemetry=self.telemetry,
            limiter=self.limiter,
            retry=self.retry,
            sleep=self.sleep,
        )
        self.route = KfRoute(name="default", engine=self.engine, texts=ReplyTexts(), dify_app="app-a")

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.clock.advance(seconds)


async def test_refusals_are_asked_again_with_backoff_beyond_the_retry_budget() -> None:
    s = Setup(dify_retries=0, dify_retry_delay_s=1.0)
    s.engine.fail_next(TOO_MANY, times=3)
    s.engine.fail_next(UNAVAILABLE)

    asked = await s.ask(message(), s.route, QUESTION)

    assert asked.answer.text and len(s.engine.questions) == 5
    assert s.slept == [0.75, 1.5, 3.0, 6.0]  # equal jitter at rng 0.5: 3/4 of 1, 2, 4, 8 s
    state = s.limiter.status()["app-a"]
    assert state["overloads"] == {"rate_limited": 3, "unavailable": 1, "refused": 0, "timeout": 0}
    assert (state["succeeded"], state["failed"], state["in_flight"]) == (1, 4, 0)
    assert s.telemetry.labelled["dify_overloads"] == {"rate_limited": 3, "unavailable": 1}


async def test_retry_after_is_honoured() -> None:
    s = Setup()
    s.engine.fail_next(ChatEngineError("too_many_requests", status=429, retryable=True, retry_after_s=7.0))

    await s.ask(message(), s.route, QUESTION)

    assert s.slept == [7.0 + 0.7 * 0.5]  # the server's wait plus up to 10 % jitter


async def test_a_refusal_whose_wait_does_not_fit_the_deadline_fails_at_once() -> None:
    s = Setup(dify_deadline_s=10.0)
    s.engine.fail_next(ChatEngineError("too_many_requests", status=429, retryable=True, retry_after_s=30.0))

    with pytest.raises(ChatEngineError) as failure:
        await s.ask(message(), s.route, QUESTION)

    assert failure.value.code == "too_many_requests" and s.slept == [] and len(s.engine.questions) == 1


async def test_refusals_stop_when_the_deadline_comes() -> None:
    s = Setup(dify_deadline_s=20.0, dify_retry_delay_s=1.0)
    s.engine.fail_next(TOO_MANY, times=50)

    with pytest.raises(ChatEngineError) as failure:
        await s.ask(message(), s.route, QUESTION)

    assert failure.value.code == "too_many_requests"
    assert sum(s.slept) <= 20.0 - 2.0  # the last attempt still had its minimum time
    assert 2 < len(s.engine.questions) < 50


async def test_an_exhausted_quota_is_logged_once_and_not_asked_during_the_cooldown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = Setup()
    s.engine.fail_next(DAILY_QUOTA)

    with caplog.at_level(logging.INFO):
        for n in range(3):
            with pytest.raises(ChatEngineError) as failure:
                await s.ask(message(f"wmQuota{n}", f"m{n}"), s.route, QUESTION)
            assert failure.value.code == ("rate_limit_error" if n == 0 else "quota_exhausted")

    assert len(s.engine.questions) == 1 and s.slept == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert (
        len(errors) == 1 and "quota exhausted" in errors[0].getMessage() and "app-a" in errors[0].getMessage()
    )
    assert s.telemetry.counters["dify_quota_exhausted"] == 1
    assert s.limiter.status()["app-a"]["quota_exhausted"] == 1
    assert s.limiter.status()["app-a"]["limit"] == 32  # fewer calls would not help: the limit stays

    s.clock.advance(s.retry.settings.quota_cooldown_s + 1)
    asked = await s.ask(message("wmLater", "m9"), s.route, QUESTION)
    assert asked.answer.text and len(s.engine.questions) == 2


async def test_a_providers_quota_is_logged_once_but_each_new_question_is_still_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = Setup()
    s.engine.fail_next(ChatEngineError("provider_quota_exceeded", "quota exhausted", status=400), times=2)

    with caplog.at_level(logging.INFO):
        for n in range(2):
            with pytest.raises(ChatEngineError):
                await s.ask(message(f"wmProvider{n}", f"m{n}"), s.route, QUESTION)
        asked = await s.ask(message("wmFixed", "m3"), s.route, QUESTION)  # the operator fixed the credentials

    assert asked.answer.text and len(s.engine.questions) == 3 and s.slept == []  # asked, never retried
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


async def test_every_dify_app_has_its_own_limit() -> None:
    s = Setup()
    other = KfRoute(name="wkOther", engine=FakeChatEngine(), texts=ReplyTexts(), dify_app="app-b")
    s.engine.fail_next(TOO_MANY)

    await s.ask(message(), s.route, QUESTION)
    await s.ask(message(), other, QUESTION)

    status = s.limiter.status()
    assert set(status) == {"app-a", "app-b"}
    assert status["app-a"]["decreases"] == 1 and status["app-b"]["decreases"] == 0


async def test_a_customer_waiting_past_the_deadline_gets_a_timeout_and_leaves_the_queue() -> None:
    limiter = AdaptiveLimiter(
        clock=FakeClock(1_700_000_100), settings=LimiterSettings(min_limit=1, max_limit=1, initial_limit=1)
    )
    s = Setup(limiter=limiter, dify_deadline_s=0.05)
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with limiter.slot("app-a", "someone else"):
            held.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await held.wait()
    with pytest.raises(ChatEngineError) as failure:
        await s.ask(message(), s.route, QUESTION)
    assert failure.value.code == "timeout" and s.engine.questions == []
    assert limiter.status()["app-a"]["queued"] == 0
    release.set()
    await holder


async def test_the_limit_grows_as_dify_accepts() -> None:
    s = Setup()
    answers_may_come = asyncio.Event()

    async def thinking(question: object, history: object) -> str:
        await answers_may_come.wait()  # accepted (the fake reports it before answering), still thinking
        return "answer"

    s.engine.responder = thinking
    asking = asyncio.gather(*(s.ask(message(f"wm{i}", f"m{i}"), s.route, QUESTION) for i in range(100)))
    for _ in range(10_000):
        if s.limiter.status().get("app-a", {}).get("in_flight") == 100:
            break
        await asyncio.sleep(0)
    assert s.limiter.status()["app-a"]["in_flight"] == 100  # all at Dify at once: slow start grew 32 → 128
    answers_may_come.set()
    await asking
    state = s.limiter.status()["app-a"]
    assert (state["succeeded"], state["in_flight"], state["queued"]) == (100, 0, 0)
    assert s.limiter.limit("app-a") > 32  # the app took every call: slow start grew past the initial limit
