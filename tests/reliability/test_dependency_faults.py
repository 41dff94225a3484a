"""Dify, WeCom and Memcached misbehave; every customer message still gets exactly one useful reply.

Each fault is injected into the fake servers the real adapters talk to over HTTP. Afterwards: messages in =
replies out, no duplicates, no 5xx at the webhook, the fault visible in /status and /metrics, and the next
message works.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable

import pytest

from tests.support.dify_server import Fault
from tests.support.stack import KF, Servers, Stack, make_settings, running

pytestmark = pytest.mark.anyio
FALLBACK = "抱歉，我暂时无法回答您的问题，请稍后再试。"


@pytest.fixture
async def stack(servers: Servers) -> AsyncIterator[Stack]:
    settings = dataclasses.replace(make_settings(servers), dify_idle_timeout_s=1.0, dify_total_timeout_s=4.0)
    async with running(settings, servers) as s:
        yield s


async def ask(stack: Stack, customer: str, text: str) -> None:
    stack.wecom.world.add_customer_text(KF, customer, text)
    resp = await stack.callback()
    assert resp.status_code == 200
    await stack.settle(30)


DIFY_FAULTS: dict[str, Callable[[], list[Fault]]] = {
    "5xx_once": lambda: [
        Fault(status=500, body={"code": "internal_server_error", "message": "x", "status": 500})
    ],
    "429_once": lambda: [
        Fault(status=429, body={"code": "too_many_requests", "message": "busy", "status": 429})
    ],
    "gateway_html_once": lambda: [
        Fault(status=502, body="<html><h1>502 Bad Gateway</h1></html>", content_type="text/html")
    ],
    "stream_stops_mid_answer_once": lambda: [Fault(eof_after=1)],
    "in_stream_error_once": lambda: [Fault(error_after=1)],
    "pings_only_once": lambda: [Fault(pings_only=True)],
    "slow_first_byte_once": lambda: [Fault(delay=6.0)],
}


@pytest.mark.parametrize("fault", sorted(DIFY_FAULTS))
async def test_a_transient_dify_fault_is_retried_or_answered_with_the_fallback(
    stack: Stack, fault: str
) -> None:
    for f in DIFY_FAULTS[fault]():
        stack.dify.inject(f)
    await ask(stack, "wmFault", "第一问")
    await ask(stack, "wmFault", "第二问")
    replies = stack.replies_to("wmFault")
    assert len(replies) == 2
    assert replies[0] in ("答：第一问", FALLBACK)
    assert replies[1] == "答：第二问"
    status = (await stack.client.get("/status", headers=stack.admin_headers())).json()
    assert sum(status["dify_errors"].values()) >= 1
    metrics = (await stack.client.get("/metrics", headers=stack.admin_headers())).text
    assert "kfdify_dify_errors_total" in metrics


async def test_dify_down_for_good_gives_fallbacks_and_status_shows_it(servers: Servers) -> None:
    settings = dataclasses.replace(
        make_settings(servers), dify_api_base="http://127.0.0.1:9/v1", dify_retries=0
    )
    async with running(settings, servers) as stack:
        await ask(stack, "wmDown", "在吗")
        assert stack.replies_to("wmDown") == [FALLBACK]
        status = (await stack.client.get("/status", headers=stack.admin_headers())).json()
        assert status["dify_errors"] == {"unreachable": 1}
        assert status["dependencies"]["dify"]["ok"] is False


@pytest.mark.parametrize("errcode", [-1, 45009, 45033])
async def test_wecom_busy_or_rate_limited_send_is_retried_with_the_same_msgid(
    stack: Stack, errcode: int
) -> None:
    stack.wecom.world.fail_next("kf/send_msg", errcode, times=2)
    await ask(stack, "wmBusy", "你好")
    assert stack.replies_to("wmBusy") == ["答：你好"]
    status = (await stack.client.get("/status", headers=stack.admin_headers())).json()
    assert status["wecom_errors"][str(errcode)] == 2


async def test_wecom_5xx_and_html_on_sync_are_retried(stack: Stack) -> None:
    stack.wecom.fail_next_http("kf/sync_msg", 502)
    stack.wecom.respond_html_next("kf/sync_msg")
    await ask(stack, "wmSync", "你好")
    assert stack.replies_to("wmSync") == ["答：你好"]


async def test_revoked_access_token_is_refreshed_once(stack: Stack) -> None:
    await ask(stack, "wmTok", "一")
    stack.wecom.revoke_tokens(42001)
    await ask(stack, "wmTok", "二")
    assert stack.replies_to("wmTok") == ["答：一", "答：二"]
    assert stack.wecom.gettoken_calls == 2


async def test_slow_wecom_still_gets_every_message_answered(stack: Stack) -> None:
    stack.wecom.delay_next("kf/sync_msg", 1.0)
    stack.wecom.delay_next("kf/send_msg", 1.0, times=3)
    for i in range(3):
        stack.wecom.world.add_customer_text(KF, f"wmSlow{i}", f"q{i}")
    await stack.callback()
    await stack.settle(30)
    for i in range(3):
        assert stack.replies_to(f"wmSlow{i}") == [f"答：q{i}"]
