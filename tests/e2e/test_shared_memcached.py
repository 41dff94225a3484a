"""Two service processes behind one callback URL share one Memcached: each message answered exactly once, in
order; a restart keeps every conversation and cursor."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapters.inbound.wecom_crypto import WeComCrypto
from tests.support.memcached import MemcachedProcess, start_memcached
from tests.support.service_process import ServiceProcess, write_config
from tests.support.stack import ADMIN_TOKEN, AES_KEY, KF, TOKEN, Servers, fake_servers, notice_xml

pytestmark = [pytest.mark.memcached, pytest.mark.slow]


@pytest.fixture
def memcached() -> Iterator[MemcachedProcess]:
    process = start_memcached()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def servers() -> Iterator[Servers]:
    with fake_servers() as s:
        yield s


def service_config(path: Path, servers: Servers, memcached: MemcachedProcess, prefix: str) -> Path:
    host, port = memcached.server
    return write_config(
        path,
        {
            "CONFIG": {
                "CORP_ID": servers.wecom.corp_id,
                "CORP_SECRET": servers.wecom.corp_secret,
                "TOKEN": TOKEN,
                "ENCODING_AES_KEY": AES_KEY,
                "DIFY_API_BASE": servers.dify_url,
                "DIFY_API_KEY": servers.dify.api_key,
                "WECOM_API_BASE": servers.wecom_url,
                "ADMIN_TOKEN": ADMIN_TOKEN,
            },
            "MEMCACHE": {"host": host, "port": port, "connect_timeout": 2, "timeout": 2, "prefix": prefix},
            "BOT": {"RECOVERY_INTERVAL": 2, "INTERIM_AFTER": 0},
        },
    )


class Callbacks:
    def __init__(self, corp_id: str) -> None:
        self.crypto = WeComCrypto(token=TOKEN, encoding_aes_key=AES_KEY, receive_id=corp_id)
        self.corp_id = corp_id
        self.nonce = 0

    def build(self) -> tuple[dict[str, str], bytes]:
        self.nonce += 1
        timestamp, nonce = str(int(time.time())), str(self.nonce)
        body, sig = self.crypto.encrypt_callback(
            notice_xml(self.corp_id, KF, token=f"T{self.nonce}"), timestamp=timestamp, nonce=nonce
        )
        return {"msg_signature": sig, "timestamp": timestamp, "nonce": nonce}, body


async def _post_all(client: httpx.AsyncClient, requests: list[tuple[str, dict[str, str], bytes]]) -> None:
    responses = await asyncio.gather(
        *(client.post(url + "/webhook", params=params, content=body) for url, params, body in requests)
    )
    assert all(r.status_code == 200 for r in responses), [r.status_code for r in responses]


def _wait_for(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _replies(servers: Servers, customer: str) -> list[str]:
    return [s.text for s in servers.wecom.sent if s.customer.external_userid == customer]


def test_two_instances_answer_each_message_exactly_once_and_in_order(
    tmp_path: Path, servers: Servers, memcached: MemcachedProcess
) -> None:
    config = service_config(tmp_path / "config.ini", servers, memcached, f"t{secrets.token_hex(4)}")
    a, b = ServiceProcess(config).start(), ServiceProcess(config).start()
    callbacks = Callbacks(servers.wecom.corp_id)
    customers = [f"wmShared{i}" for i in range(10)]
    rounds = 4
    try:

        async def drive() -> None:
            async with httpx.AsyncClient(timeout=10) as client:
                for round_ in range(rounds):
                    for c in customers:
                        servers.wecom.add_customer_text(KF, c, f"{c}#{round_}")
                    params, body = callbacks.build()
                    # WeCom retries (the same callback, byte for byte) and overlapping callbacks, spread over
                    # both instances.
                    second = callbacks.build()
                    await _post_all(
                        client,
                        [
                            (a.url, params, body),
                            (b.url, params, body),
                            (a.url, params, body),
                            (b.url, *second),
                            (a.url, *second),
                        ],
                    )
                    await asyncio.sleep(0.05)

        asyncio.run(drive())
        _wait_for(lambda: len(servers.wecom.sent) >= len(customers) * rounds)
        time.sleep(1.0)  # anything answered twice would show up now
        for c in customers:
            assert _replies(servers, c) == [f"答：{c}#{r}" for r in range(rounds)], c
        assert len(servers.wecom.sent) == len(customers) * rounds
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
    config = service_config(tmp_path / "config.ini", servers, memcached, f"t{secrets.token_hex(4)}")
    callbacks = Callbacks(servers.wecom.corp_id)

    def callback(service: ServiceProcess) -> None:
        params, body = callbacks.build()
        assert httpx.post(service.url + "/webhook", params=params, content=body).status_code == 200

    first = ServiceProcess(config).start()
    try:
        servers.wecom.add_customer_text(KF, "wmRestart", "记住我")
        callback(first)
        _wait_for(lambda: len(servers.wecom.sent) == 1)
    finally:
        first.stop()
    conversation_id = servers.dify.chat_requests()[0]
    second = ServiceProcess(config).start()
    try:
        servers.wecom.add_customer_text(KF, "wmRestart", "我是谁")
        callback(second)
        _wait_for(lambda: len(servers.wecom.sent) == 2)
        time.sleep(0.5)
        assert _replies(servers, "wmRestart") == ["答：记住我", "答：我是谁"]
        asked = servers.dify.chat_requests()
        assert len(asked) == 2
        assert asked[1].json["conversation_id"] == next(iter(servers.dify.conversations))
        assert conversation_id.json.get("conversation_id") in (None, "")
        # The restarted instance continued from the stored cursor instead of re-reading history.
        after_restart = [r for r in servers.wecom.sync_requests][-1]
        assert after_restart.cursor
        status = httpx.get(second.url + "/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
        assert status["store"]["backend"] == "memcached" and status["store"]["reachable"] is True
    finally:
        second.stop()
