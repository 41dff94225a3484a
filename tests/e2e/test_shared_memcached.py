"""Two service processes behind one callback URL share one Memcached: each message answered exactly once, in
order; a restart keeps every conversation and cursor."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import httpx
import pytest

from tests.support.memcached import MemcachedProcess
from tests.support.service_process import ServiceProcess, service_config, signed_callback, wait_for
from tests.support.stack import ADMIN_TOKEN, KF, Servers

pytestmark = [pytest.mark.memcached, pytest.mark.slow]


def _replies(servers: Servers, customer: str) -> list[str]:
    return [s.text for s in servers.wecom.world.sent if s.customer.external_userid == customer]


def test_two_instances_answer_each_message_exactly_once_and_in_order(
    tmp_path: Path, servers: Servers, memcached: MemcachedProcess
) -> None:
    config = service_config(
        tmp_path / "config.ini",
        servers,
        memcached=memcached,
        prefix=f"t{secrets.token_hex(4)}",
        bot={"RECOVERY_INTERVAL": 2},
    )
    a, b = ServiceProcess(config).start(), ServiceProcess(config).start()
    customers = [f"wmShared{i}" for i in range(10)]
    rounds = 4
    try:

        async def drive() -> None:
            async with httpx.AsyncClient(timeout=10) as client:
                for round_ in range(rounds):
                    for c in customers:
                        servers.wecom.world.add_customer_text(KF, c, f"{c}#{round_}")
                    first = signed_callback(servers.wecom.corp_id, KF)
                    second = signed_callback(servers.wecom.corp_id, KF)
                    # WeCom retries (the same callback, byte for byte) and overlapping callbacks, spread over
                    # both instances.
                    targets = [(a, first), (b, first), (a, first), (b, second), (a, second)]
                    responses = await asyncio.gather(
                        *(
                            client.post(service.url + "/webhook", params=params, content=body)
                            for service, (params, body) in targets
                        )
                    )
                    assert [r.status_code for r in responses] == [200] * len(targets)
                    await asyncio.sleep(0.05)

        asyncio.run(drive())
        wait_for(lambda: len(servers.wecom.world.sent) >= len(customers) * rounds, what="all replies")
        time.sleep(1.0)  # anything answered twice would show up now
        for c in customers:
            assert _replies(servers, c) == [f"答：{c}#{r}" for r in range(rounds)], c
        assert len(servers.wecom.world.sent) == len(customers) * rounds
        asked = servers.dify.chat_requests()
        assert len(asked) == len(customers) * rounds
        # Every customer's later questions continue the conversation the first one started.
        for c in customers:
            ids = [r.json.get("conversation_id") for r in asked if r.json["user"].endswith(c)]
            assert not ids[0] and len(set(ids[1:])) == 1 and ids[1]
    finally:
        a.stop()
        b.stop()
    for service in (a, b):
        assert "Traceback" not in service.logs()


def test_restart_keeps_conversations_and_cursors(
    tmp_path: Path, servers: Servers, memcached: MemcachedProcess
) -> None:
    config = service_config(
        tmp_path / "config.ini", servers, memcached=memcached, prefix=f"t{secrets.token_hex(4)}"
    )

    def callback(service: ServiceProcess) -> None:
        params, body = signed_callback(servers.wecom.corp_id, KF)
        assert httpx.post(service.url + "/webhook", params=params, content=body).status_code == 200

    first = ServiceProcess(config).start()
    try:
        servers.wecom.world.add_customer_text(KF, "wmRestart", "记住我")
        callback(first)
        wait_for(lambda: len(servers.wecom.world.sent) == 1, what="first reply")
    finally:
        first.stop()
    second = ServiceProcess(config).start()
    try:
        servers.wecom.world.add_customer_text(KF, "wmRestart", "我是谁")
        callback(second)
        wait_for(lambda: len(servers.wecom.world.sent) == 2, what="reply after restart")
        time.sleep(0.5)
        assert _replies(servers, "wmRestart") == ["答：记住我", "答：我是谁"]
        asked = servers.dify.chat_requests()
        assert len(asked) == 2
        assert not asked[0].json.get("conversation_id")
        assert asked[1].json["conversation_id"] == next(iter(servers.dify.conversations))
        # The restarted instance continued from the stored cursor instead of re-reading history.
        assert servers.wecom.world.sync_requests[-1].cursor
        status = httpx.get(second.url + "/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
        assert status["store"]["backend"] == "memcached" and status["store"]["reachable"] is True
    finally:
        second.stop()
