"""The original system's admin endpoints, behind ADMIN_TOKEN, and the health checks."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import httpx
import pytest

from adapters.inbound.auth_throttle import BASE_LOCKOUT_S, THRESHOLD
from tests.support.stack import ADMIN_TOKEN, KF, Servers, Stack, make_settings, running

pytestmark = pytest.mark.anyio


@pytest.fixture
async def stack(servers: Servers) -> AsyncIterator[Stack]:
    async with running(make_settings(servers), servers) as s:
        yield s


async def _talk(stack: Stack, customer: str, text: str) -> None:
    stack.wecom.world.add_customer_text(KF, customer, text)
    await stack.callback()
    await stack.settle()


ADMIN_ROUTES = [
    ("GET", "/status", None),
    ("POST", "/clear", None),
    ("GET", "/get_conversation?user_id=wm1", None),
    ("POST", "/reset_conversation", {"user_id": "wm1"}),
    ("GET", "/metrics", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
async def test_admin_endpoints_refuse_without_the_token(
    stack: Stack, method: str, path: str, body: object
) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": ADMIN_TOKEN},
        {"Authorization": "Basic x"},
    ):
        resp = await stack.client.request(method, path, json=body, headers=headers)
        assert resp.status_code == 401
        assert "error" in resp.json()


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
async def test_admin_endpoints_are_closed_when_no_token_is_configured(
    servers: Servers, method: str, path: str, body: object
) -> None:
    settings = dataclasses.replace(make_settings(servers), admin_token="")
    async with running(settings, servers) as stack:
        resp = await stack.client.request(method, path, json=body, headers={"Authorization": "Bearer "})
        assert resp.status_code == 403
        assert "ADMIN_TOKEN" in resp.json()["error"]


async def test_get_and_reset_a_customers_conversation(stack: Stack) -> None:
    await _talk(stack, "wmAdmin", "你好")
    h = stack.admin_headers()
    resp = await stack.client.get("/get_conversation", params={"user_id": "wmAdmin"}, headers=h)
    assert resp.status_code == 200
    body = resp.json()
    assert body["user_id"] == "wmAdmin" and body["open_kfid"] == KF
    assert body["conversation_id"] in stack.dify.conversations
    resp = await stack.client.get(
        "/get_conversation", params={"user_id": "wmAdmin", "open_kfid": KF}, headers=h
    )
    assert resp.json()["conversation_id"] == body["conversation_id"]

    resp = await stack.client.post("/reset_conversation", json={"user_id": "wmAdmin"}, headers=h)
    assert resp.status_code == 200 and resp.json()["reset"] is True
    resp = await stack.client.get("/get_conversation", params={"user_id": "wmAdmin"}, headers=h)
    assert resp.status_code == 404
    await _talk(stack, "wmAdmin", "再问")
    assert not stack.dify.chat_requests()[-1].json.get("conversation_id")


async def test_unknown_users_and_bad_bodies_get_4xx_json(stack: Stack) -> None:
    h = stack.admin_headers()
    cases = [
        ("GET", "/get_conversation", None, None, 400),
        ("GET", "/get_conversation?user_id=nobody", None, None, 404),
        ("POST", "/reset_conversation", None, b"", 400),
        ("POST", "/reset_conversation", None, b"{not json", 400),
        ("POST", "/reset_conversation", None, b"[1,2]", 400),
        ("POST", "/reset_conversation", {"user_id": 5}, None, 400),
        ("POST", "/reset_conversation", {"user_id": "nobody"}, None, 404),
        ("POST", "/reset_conversation", {"user_id": "x", "open_kfid": 3}, None, 400),
    ]
    for method, path, json_body, raw, expected in cases:
        resp = await stack.client.request(method, path, json=json_body, content=raw, headers=h)
        assert resp.status_code == expected, (path, json_body, raw)
        assert "error" in resp.json()


async def test_clear_forgets_conversations(stack: Stack) -> None:
    await _talk(stack, "wmC", "你好")
    h = stack.admin_headers()
    assert (await stack.client.post("/clear", headers=h)).json() == {"cleared": True}
    resp = await stack.client.get("/get_conversation", params={"user_id": "wmC"}, headers=h)
    assert resp.status_code == 404


async def test_status_reports_counters_and_dependencies_without_secrets(stack: Stack) -> None:
    await _talk(stack, "wmSt", "你好")
    resp = await stack.client.get("/status", headers=stack.admin_headers())
    assert resp.status_code == 200
    status = resp.json()
    assert status["store"]["backend"] == "memory" and status["store"]["reachable"] is True
    assert status["counters"]["callbacks"] == 1
    assert status["counters"]["answered"] == 1
    assert status["counters"]["messages_pulled"] == 1
    assert status["dependencies"]["dify"]["ok"] is True
    assert status["latency_s"]["dify"]["count"] == 1
    assert "version" in status and status["uptime_s"] >= 0
    text = resp.text
    for secret in stack.settings.secrets():
        assert secret not in text


async def test_health_endpoints_are_open(stack: Stack) -> None:
    assert (await stack.client.get("/healthz")).json() == {"status": "ok"}
    ready = await stack.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True


async def test_unknown_paths_are_json_404(stack: Stack) -> None:
    resp = await stack.client.get("/nope")
    assert resp.status_code == 404 and resp.json() == {"error": "not found"}
    assert (await stack.client.put("/webhook")).status_code == 405


async def test_metrics_after_a_scripted_conversation(stack: Stack) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    await _talk(stack, "wmMet1", "你好")
    await _talk(stack, "wmMet1", "重置")
    await _talk(stack, "wmMet2", "在吗")
    resp = await stack.client.get("/metrics", headers=stack.admin_headers())
    assert resp.status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }
    assert samples[("kfdify_callbacks_total", ())] == 3
    assert samples[("kfdify_answered_total", ())] == 2
    assert samples[("kfdify_resets_total", ())] == 1
    assert samples[("kfdify_replies_sent_total", ())] == 3
    assert samples[("kfdify_dify_seconds_count", ())] == 2
    assert samples[("kfdify_callback_ack_seconds_count", ())] == 3
    assert samples[("kfdify_send_seconds_count", ())] == 3


def _client_from(stack: Stack, address: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=stack.app, client=(address, 40000)), base_url="http://kf-dify.test"
    )


async def test_repeated_wrong_tokens_lock_that_address_out_but_not_others(stack: Stack) -> None:
    wrong = {"Authorization": "Bearer not-the-token"}
    async with _client_from(stack, "203.0.113.7") as guesser, _client_from(stack, "198.51.100.2") as operator:
        answers = [(await guesser.get("/status", headers=wrong)).status_code for _ in range(THRESHOLD)]
        assert answers == [401] * (THRESHOLD - 1) + [429]
        locked = await guesser.get("/metrics", headers=stack.admin_headers())  # even with the right token
        assert locked.status_code == 429 and 0 < int(locked.headers["retry-after"]) <= BASE_LOCKOUT_S
        assert "error" in locked.json() and ADMIN_TOKEN not in locked.text
        # Another address is not affected, and its success does not unlock the guesser.
        assert (await operator.get("/status", headers=stack.admin_headers())).status_code == 200
        assert (await operator.get("/metrics", headers=stack.admin_headers())).status_code == 200
        assert (await guesser.get("/status", headers=stack.admin_headers())).status_code == 429
        # The open endpoints stay open for the locked-out address.
        assert (await guesser.get("/healthz")).status_code == 200
