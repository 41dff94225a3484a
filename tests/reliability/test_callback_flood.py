"""A flood of valid callbacks for one kf account: every one acknowledged, pulls coalesced, memory bounded."""

from __future__ import annotations

import asyncio
import os
import time
import tracemalloc
from collections.abc import AsyncIterator

import pytest

from tests.support.stack import KF, Servers, Stack, make_settings, notice_xml, running

pytestmark = pytest.mark.anyio
FLOOD = int(os.environ.get("KF_FLOOD_CALLBACKS", "2000"))


@pytest.fixture
async def stack(servers: Servers) -> AsyncIterator[Stack]:
    async with running(make_settings(servers), servers) as s:
        yield s


async def test_a_flood_is_acknowledged_and_coalesced_into_a_handful_of_pulls(stack: Stack) -> None:
    customers = [f"wmFlood{i}" for i in range(50)]
    for c in customers:
        stack.wecom.world.add_customer_text(KF, c, "抢购开始了吗")
    # Pre-build distinct, validly signed callbacks (as WeCom sends one per event).
    requests = []
    for i in range(FLOOD):
        ts, nonce = str(int(time.time())), str(100_000 + i)
        body, sig = stack.crypto.encrypt_callback(
            notice_xml(stack.settings.corp_id, KF, token=f"T{i}"), timestamp=ts, nonce=nonce
        )
        requests.append(({"msg_signature": sig, "timestamp": ts, "nonce": nonce}, body))

    tracemalloc.start()
    started = time.monotonic()
    statuses: list[int] = []
    slowest = 0.0

    async def post(params: dict[str, str], body: bytes) -> None:
        nonlocal slowest
        t0 = time.monotonic()
        resp = await stack.client.post("/webhook", params=params, content=body)
        slowest = max(slowest, time.monotonic() - t0)
        statuses.append(resp.status_code)

    for batch in range(0, FLOOD, 250):
        await asyncio.gather(*(post(p, b) for p, b in requests[batch : batch + 250]))
    elapsed = time.monotonic() - started
    await stack.settle(60)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert statuses.count(200) == FLOOD
    # WeCom waits 5 s before retrying; every acknowledgement came back well within that.
    assert slowest < 5.0, slowest
    assert stack.wecom.sync_calls <= 10, stack.wecom.sync_calls
    for c in customers:
        assert stack.replies_to(c) == ["答：抢购开始了吗"]
    # Nothing per-callback is kept: the flood costs no more memory than a bounded amount.
    assert peak < 64 * 1024 * 1024, peak
    counters = (await stack.client.get("/status", headers=stack.admin_headers())).json()["counters"]
    assert counters["callbacks"] == FLOOD
    assert counters.get("pulls_coalesced", 0) > FLOOD // 2
    calls = stack.wecom.sync_calls
    print(f"{FLOOD} callbacks in {elapsed:.2f} s, {calls} sync_msg calls, peak {peak >> 20} MiB")
