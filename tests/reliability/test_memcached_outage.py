"""Memcached goes away and comes back: customers keep getting answers, once each; one log line per outage."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest

from tests.support.memcached import MemcachedProcess
from tests.support.stack import KF, Servers, Stack, make_settings, memcache_settings, running

pytestmark = [pytest.mark.anyio, pytest.mark.memcached]


async def ask(stack: Stack, customer: str, text: str) -> None:
    stack.wecom.world.add_customer_text(KF, customer, text)
    assert (await stack.callback()).status_code == 200
    await stack.settle(30)


async def test_answers_continue_through_an_outage_and_recover(
    servers: Servers, memcached: MemcachedProcess, caplog: pytest.LogCaptureFixture
) -> None:
    settings = dataclasses.replace(
        make_settings(servers), memcache=memcache_settings(memcached.address, "outage")
    )
    caplog.set_level(logging.INFO)
    async with running(settings, servers) as stack:
        await ask(stack, "wmM", "一")
        memcached.kill()
        for i in range(3):
            await ask(stack, "wmM", f"停机中{i}")
            # A retried callback during the outage must not produce a second answer.
            assert (await stack.callback()).status_code == 200
            await stack.settle(30)
        status = (await stack.client.get("/status", headers=stack.admin_headers())).json()
        assert status["store"]["degraded"] is True
        ready = await stack.client.get("/readyz")
        assert ready.status_code == 503
        memcached.restart()
        store = stack.container.adapters.store()
        # The store probes Memcached again every 5 s, on the next operation after that.
        for _ in range(150):
            await store.known_kfs()
            if not store.degraded:
                break
            await asyncio.sleep(0.1)
        assert not store.degraded
        await ask(stack, "wmM", "恢复后")
        assert stack.replies_to("wmM") == [
            "答：一",
            "答：停机中0",
            "答：停机中1",
            "答：停机中2",
            "答：恢复后",
        ]
        status = (await stack.client.get("/status", headers=stack.admin_headers())).json()
        assert status["store"]["reachable"] is True
    outage_warnings = [
        r for r in caplog.records if "degraded" in r.getMessage() and r.levelno == logging.WARNING
    ]
    assert len(outage_warnings) == 1
    assert any("reachable again" in r.getMessage() for r in caplog.records)
