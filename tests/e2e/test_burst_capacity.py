"""A burst of customers against a Dify app that refuses (429) beyond its concurrency cap: the adaptive limiter
and the retry policy answer every customer, the interim text covers long waits, and an exhausted quota is
one fallback per customer and one ERROR in the log, not a loop."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from application.options import ReplyTexts
from tests.support.dify_server import Fault
from tests.support.stack import KF, Servers, fake_servers, make_settings, running

pytestmark = pytest.mark.anyio

TEXTS = ReplyTexts()


@pytest.fixture
def capped() -> Iterator[Servers]:
    """A Dify app that takes at most 10 answers at once; each answer streams for a little while."""
    with fake_servers(capacity=10, chunk_delay=0.01) as servers:
        yield servers


async def test_a_burst_beyond_the_apps_capacity_is_answered_without_fallbacks(capped: Servers) -> None:
    customers = [f"wmBurst{i:03d}" for i in range(100)]
    async with running(make_settings(capped, dify_retries=0), capped) as stack:
        for c in customers:
            stack.wecom.world.add_customer_text(KF, c, f"{c}的问题")
        assert (await stack.callback()).status_code == 200
        await stack.settle(timeout=60)

        for c in customers:
            assert stack.replies_to(c) == [f"答：{c}的问题"], c
        assert capped.dify.peak_answering <= 10
        answered = [r for r in capped.dify.chat_requests() if r.json]
        assert len(answered) == 100 + capped.dify.over_capacity  # refused ones were asked again, once each
        status = (await stack.client.get("/status", headers=stack.admin_headers())).json()
        (app,) = status["dify_apps"].values()
        assert (app["succeeded"], app["in_flight"], app["queued"]) == (100, 0, 0)
        assert app["overloads"]["rate_limited"] == capped.dify.over_capacity
        assert 4 <= app["limit"] <= 1000
        assert capped.dify.api_key not in str(status)
        metrics = (await stack.client.get("/metrics", headers=stack.admin_headers())).text
        assert "kfdify_dify_limit{" in metrics and "kfdify_dify_queued{" in metrics


async def test_a_429_with_retry_after_is_waited_out_and_answered() -> None:
    with fake_servers(capacity=2, capacity_retry_after=0.2, chunk_delay=0.01) as servers:
        # The two answers in flight wait until Dify has refused a third caller, so the refusal does not hang
        # on how fast the machine gets the next questions out.
        servers.dify.hold = (0, lambda: servers.dify.over_capacity > 0)
        customers = [f"wmRetry{i}" for i in range(12)]
        async with running(make_settings(servers), servers) as stack:
            for c in customers:
                stack.wecom.world.add_customer_text(KF, c, "在吗")
            await stack.callback()
            await stack.settle(timeout=60)
            assert all(stack.replies_to(c) == ["答：在吗"] for c in customers)
            assert servers.dify.over_capacity > 0 and servers.dify.peak_answering <= 2


async def test_customers_waiting_long_get_the_interim_text_then_the_answer() -> None:
    def long_answer(query: str, history: object) -> str:
        return "答：" + "很" * 38  # 10 chunks of 4 characters, 0.1 s apart: each answer takes about 1 s

    with fake_servers(capacity=1, chunk_delay=0.1, answer=long_answer) as servers:
        customers = ["wmWaitA", "wmWaitB", "wmWaitC"]
        settings = make_settings(servers, interim_after_s=0.3)
        async with running(settings, servers) as stack:
            for c in customers:
                stack.wecom.world.add_customer_text(KF, c, "请问")
            await stack.callback()
            await stack.settle(timeout=60)
            for c in customers:
                assert stack.replies_to(c) == [TEXTS.interim, long_answer("", ())], c
            assert servers.dify.peak_answering == 1


async def test_an_exhausted_quota_gets_the_fallback_and_one_error_log(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    quota = {
        "code": "rate_limit_error",
        "message": "You have reached the daily limit of this app.",
        "status": 429,
    }
    servers.dify.inject(Fault(status=429, body=quota))
    async with running(make_settings(servers), servers) as stack:
        with caplog.at_level(logging.INFO):
            stack.wecom.world.add_customer_text(KF, "wmQuota1", "你好")
            await stack.callback()
            await stack.settle()
            for c in ("wmQuota2", "wmQuota3"):  # during the cooldown: not asked at all
                stack.wecom.world.add_customer_text(KF, c, "你好")
            await stack.callback()
            await stack.settle()

        for c in ("wmQuota1", "wmQuota2", "wmQuota3"):
            assert stack.replies_to(c) == [TEXTS.fallback], c
        assert len(servers.dify.chat_requests()) == 1
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "quota exhausted" in errors[0].getMessage()
        assert servers.dify.api_key not in caplog.text
