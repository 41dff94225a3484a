"""Two service processes behind one callback URL, one Memcached: they act as one bot.

- A burst of 200 customers, callbacks spread over both, Dify slow enough that one instance cannot answer it
  alone before the other joins: every message is answered exactly once, in order, and each instance answers
  between 25 % and 75 % (the pulling instance does not keep the burst to itself).
- A customer writing more than the rate limit, with each message landing on the other instance, gets the limit
  and one notice in total, not the limit per instance.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.outbound.fake_wecom import KfWorld
from adapters.outbound.memcached_store import MemcachedStateStore
from domain.messages import CustomerRef
from tests.support.memcached import MemcachedProcess
from tests.support.service_process import ServiceProcess, service_config, signed_callback, wait_for
from tests.support.stack import ADMIN_TOKEN, KF, Servers, fake_servers

pytestmark = [pytest.mark.memcached, pytest.mark.slow]

CUSTOMERS = 200
DRAINS_PER_INSTANCE = 6  # DIFY_CONCURRENCY: what one instance asks Dify at once


@pytest.fixture
def slow_dify() -> Iterator[Servers]:
    """Dify streams each answer in three chunks 0.25 s apart: one instance alone would need about
    200 / 6 × 0.5 s ≈ 17 s for the burst, far longer than the callbacks take to reach both."""
    with fake_servers(chunk_delay=0.25) as servers:
        yield servers


def _status(service: ServiceProcess) -> dict[str, Any]:
    response = httpx.get(
        service.url + "/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    )
    response.raise_for_status()
    return dict(response.json())


def _sent_at_least(world: KfWorld, count: int) -> bool:
    return len(world.sent) >= count


def _answered(service: ServiceProcess) -> int:
    return int(_status(service)["counters"].get("answered", 0))


def _pending(memcached: MemcachedProcess, prefix: str, customers: list[str]) -> int:
    """Messages still waiting in the shared inbox, read from outside through the store itself."""

    async def count() -> int:
        store = MemcachedStateStore(servers=[memcached.server], prefix=prefix)
        try:
            waiting = [await store.pending(CustomerRef(KF, c)) for c in customers]
            return sum(len(messages) for messages in waiting)
        finally:
            await store.aclose()

    return asyncio.run(count())


async def _callbacks(corp_id: str, targets: list[ServiceProcess]) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        responses = await asyncio.gather(
            *(
                client.post(service.url + "/webhook", params=params, content=body)
                for service, (params, body) in ((s, signed_callback(corp_id, KF)) for s in targets)
            )
        )
    assert [r.status_code for r in responses] == [200] * len(targets)


def test_a_burst_is_shared_and_answered_exactly_once_in_order(
    tmp_path: Path, slow_dify: Servers, memcached: MemcachedProcess
) -> None:
    servers, prefix = slow_dify, f"t{secrets.token_hex(4)}"
    config = service_config(
        tmp_path / "config.ini",
        servers,
        memcached=memcached,
        prefix=prefix,
        bot={"RATE_LIMIT": 0, "DIFY_CONCURRENCY": DRAINS_PER_INSTANCE, "RECOVERY_INTERVAL": 5},
    )
    a, b = ServiceProcess(config).start(), ServiceProcess(config).start()
    customers = [f"wmBurst{i:03d}" for i in range(CUSTOMERS)]
    try:
        # Every customer writes; each message's callback goes to one of the two (alternating), in waves.
        for start in range(0, CUSTOMERS, 20):
            for c in customers[start : start + 20]:
                servers.wecom.world.add_customer_text(KF, c, f"{c}#0")
            asyncio.run(_callbacks(servers.wecom.corp_id, [a, b] * 10))
        # Two customers write a second message, to check order across instances.
        for c in customers[:2]:
            servers.wecom.world.add_customer_text(KF, c, f"{c}#1")
        asyncio.run(_callbacks(servers.wecom.corp_id, [b, a]))
        total = CUSTOMERS + 2

        wait_for(lambda: len(servers.wecom.world.sent) >= total, timeout=120, what="every reply")
        # Done means: nothing waits in the inbox, nothing is being answered, and the instances' counts add up.
        wait_for(
            lambda: (
                _pending(memcached, prefix, customers) == 0
                and all(_status(s)["in_flight"] == 0 for s in (a, b))
                and _answered(a) + _answered(b) >= total
            ),
            timeout=60,
            what="both instances idle",
        )
        sent = servers.wecom.world.sent
        assert len(sent) == total
        assert set(Counter((s.customer.external_userid, s.text) for s in sent).values()) == {1}
        for c in customers[:2]:
            assert [s.text for s in sent if s.customer.external_userid == c] == [f"答：{c}#0", f"答：{c}#1"]
        assert len(servers.dify.chat_requests()) == total
        shares = [_answered(a), _answered(b)]
        assert sum(shares) == total
        assert all(0.25 <= n / total <= 0.75 for n in shares), shares
    finally:
        a.stop()
        b.stop()
    for service in (a, b):
        assert "Traceback" not in service.logs()


def test_the_rate_limit_holds_across_instances(
    tmp_path: Path, servers: Servers, memcached: MemcachedProcess
) -> None:
    prefix = f"t{secrets.token_hex(4)}"
    config = service_config(
        tmp_path / "config.ini",
        servers,
        memcached=memcached,
        prefix=prefix,
        bot={"RATE_LIMIT": 3, "RATE_LIMIT_WINDOW": 600},
    )
    a, b = ServiceProcess(config).start(), ServiceProcess(config).start()
    customer, world = "wmEager", servers.wecom.world
    try:
        # One message at a time, each callback on the other instance: A, B, A answer; B sends the notice.
        for n, service in enumerate([a, b, a, b]):
            world.add_customer_text(KF, customer, f"m{n}")
            asyncio.run(_callbacks(servers.wecom.corp_id, [service]))
            wait_for(partial(_sent_at_least, world, n + 1), what=f"the outcome of message {n}")
        # Two more, one on each instance: over the limit, quiet (the notice went out already).
        for n, service in ((4, a), (5, b)):
            world.add_customer_text(KF, customer, f"m{n}")
            asyncio.run(_callbacks(servers.wecom.corp_id, [service]))
        wait_for(lambda: _pending(memcached, prefix, [customer]) == 0, what="every message handled")
        wait_for(lambda: all(_status(s)["in_flight"] == 0 for s in (a, b)), what="both idle")

        texts = [s.text for s in world.sent if s.customer.external_userid == customer]
        notice = "您发送消息太频繁了，请稍后再试。"
        assert texts == ["答：m0", "答：m1", "答：m2", notice]
        assert len(servers.dify.chat_requests()) == 3
        # Normally the instance that pulled a message answers it (A, B, A): with a limit per instance, m3
        # would have been B's second answer instead of the notice.
        assert _answered(a) + _answered(b) == 3
    finally:
        a.stop()
        b.stop()
    for service in (a, b):
        assert "Traceback" not in service.logs()
