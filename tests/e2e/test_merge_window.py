"""Bursts of texts through the whole service ([BOT] MERGE_WINDOW): a signed callback in, real adapters over
HTTP to the fake WeCom and Dify servers, one answer out per burst."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from application.options import ReplyTexts
from application.ports import MessageState
from domain.dedupe import DedupeKey
from tests.support.memcached import MemcachedProcess
from tests.support.service_process import ServiceProcess, service_config, signed_callback, wait_for
from tests.support.stack import KF, Servers, Stack, make_settings, running

TEXTS = ReplyTexts()


@pytest.fixture
async def stack(servers: Servers) -> AsyncIterator[Stack]:
    async with running(make_settings(servers, merge_window_s=1.0), servers) as s:
        yield s


def questions(stack: Stack, customer: str) -> list[str]:
    return [r.json["query"] for r in stack.dify.chat_requests() if r.json["user"].endswith(customer)]


@pytest.mark.anyio
async def test_a_burst_is_asked_as_one_question_and_answered_once(stack: Stack) -> None:
    for text in ("你好", "我想退货", "订单号 12345"):
        stack.wecom.world.add_customer_text(KF, "wmBurst", text)

    assert (await stack.callback()).status_code == 200
    await stack.settle()

    assert questions(stack, "wmBurst") == ["你好\n我想退货\n订单号 12345"]
    assert stack.replies_to("wmBurst") == ["答：你好\n我想退货\n订单号 12345"]
    assert stack.container.telemetry().counters["merged_messages"] == 2


@pytest.mark.anyio
async def test_a_reset_inside_a_burst_acts_on_its_own_after_the_texts_before_it(stack: Stack) -> None:
    for text in ("你好", "在吗", "重置", "我想退货", "订单号 12345"):
        stack.wecom.world.add_customer_text(KF, "wmReset", text)

    await stack.callback()
    await stack.settle()

    assert stack.replies_to("wmReset") == ["答：你好\n在吗", TEXTS.reset_done, "答：我想退货\n订单号 12345"]
    asked = [r.json for r in stack.dify.chat_requests() if r.json["user"].endswith("wmReset")]
    assert not asked[1].get("conversation_id")  # the reset started a new conversation


@pytest.mark.anyio
async def test_a_text_sent_while_the_bot_waits_for_more_joins_the_question(servers: Servers) -> None:
    async with running(make_settings(servers, merge_window_s=4.0), servers) as stack:
        first = stack.wecom.world.add_customer_text(KF, "wmLate", "你好")
        await stack.callback()
        store = stack.container.adapters.store()

        async def claimed() -> None:
            while await store.state(DedupeKey(KF, first)) is not MessageState.BUSY:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(claimed(), 20)
        stack.wecom.world.add_customer_text(KF, "wmLate", "我想退货")
        await stack.callback()
        await stack.settle()

        assert questions(stack, "wmLate") == ["你好\n我想退货"]
        assert stack.replies_to("wmLate") == ["答：你好\n我想退货"]


@pytest.mark.memcached
@pytest.mark.slow
def test_two_instances_answer_each_burst_once(
    tmp_path: Path, servers: Servers, memcached: MemcachedProcess
) -> None:
    config = service_config(
        tmp_path / "config.ini",
        servers,
        memcached=memcached,
        prefix=f"t{secrets.token_hex(4)}",
        bot={"MERGE_WINDOW": 1, "RECOVERY_INTERVAL": 2},
    )
    a, b = ServiceProcess(config).start(), ServiceProcess(config).start()
    customers = [f"wmTwo{i}" for i in range(6)]
    try:
        for c in customers:
            for part in ("你好", "我想退货", "订单号"):
                servers.wecom.world.add_customer_text(KF, c, f"{c}{part}")

        async def callbacks() -> None:
            async with httpx.AsyncClient(timeout=10) as client:
                targets = [a, b, a, b]
                signed = [signed_callback(servers.wecom.corp_id, KF) for _ in targets]
                responses = await asyncio.gather(
                    *(
                        client.post(service.url + "/webhook", params=params, content=body)
                        for service, (params, body) in zip(targets, signed, strict=True)
                    )
                )
                assert [r.status_code for r in responses] == [200] * len(targets)

        asyncio.run(callbacks())
        wait_for(lambda: len(servers.wecom.world.sent) >= len(customers), what="one answer per customer")
    finally:
        a.stop()
        b.stop()  # both drained: anything answered twice has been sent by now
    for c in customers:
        burst = "\n".join(f"{c}{part}" for part in ("你好", "我想退货", "订单号"))
        replies = [s.text for s in servers.wecom.world.sent if s.customer.external_userid == c]
        assert replies == [f"答：{burst}"], c
    assert len(servers.dify.chat_requests()) == len(customers)
    for service in (a, b):
        assert "Traceback" not in service.logs()
