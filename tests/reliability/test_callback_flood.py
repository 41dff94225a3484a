"""A flood of valid callbacks for one kf account: every one acknowledged, pulls coalesced, memory bounded."""

from __future__ import annotations

import asyncio
import os
import time
import tracemalloc
from collections.abc import AsyncIterator

import anyio
import pytest

from adapters.outbound.wecom_paths import SYNC_MSG
from tests.support.stack import KF, Servers, Stack, make_settings, notice_xml, running

pytestmark = pytest.mark.anyio
FLOOD = int(os.environ.get("KF_FLOOD_CALLBACKS", "400"))
BATCH = 100


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

    async def post(params: dict[str, str], body: bytes) -> None:
        resp = await stack.client.post("/webhook", params=params, content=body)
        statuses.append(resp.status_code)

    # WeCom holds every sync_msg until the flood is over: each callback is acknowledged while the pull it
    # asked for cannot finish (WeCom retries a callback not acknowledged within 5 s), and the flood meets a
    # pull in progress, as it does when WeCom is slow under load, whatever this machine's speed.
    stack.wecom.hold(SYNC_MSG)
    try:
        await post(*requests[0])
        with anyio.fail_after(60):  # a guard against a hang only
            while not stack.wecom.waiting(SYNC_MSG):
                await anyio.sleep(0.01)
        for batch in range(1, FLOOD, BATCH):
            await asyncio.gather(*(post(p, b) for p, b in requests[batch : batch + BATCH]))
        assert statuses.count(200) == FLOOD  # all acknowledged before any pull could answer
        assert stack.wecom.waiting(SYNC_MSG) <= 1  # one pull at a time, not one per callback
    finally:
        stack.wecom.release(SYNC_MSG)
    elapsed = time.monotonic() - started
    await stack.settle(60)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert statuses.count(200) == FLOOD
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
