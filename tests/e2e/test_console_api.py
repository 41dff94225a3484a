"""The operator console's admin endpoints (/admin/...) and its static page, over the real app."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from adapters.inbound.console_api import ASSETS
from application.hints import dify_hint_for, wecom_hint_for
from tests.support.dify_server import Fault
from tests.support.stack import KF, Servers, Stack, make_settings, running

pytestmark = pytest.mark.anyio

CONSOLE_DIR = Path(__file__).resolve().parents[2] / "adapters" / "inbound" / "console"
SESSION = "tab-session-0001"

CONSOLE_ROUTES = [
    ("GET", "/admin/overview", None),
    ("GET", "/admin/customers?q=wm", None),
    ("GET", f"/admin/customers/{KF}/wmA", None),
    ("GET", "/admin/problems", None),
    ("POST", "/admin/try", {"text": "你好", "session": SESSION}),
    ("POST", "/admin/try/reset", {"session": SESSION}),
]


@pytest.fixture
async def stack(servers: Servers) -> AsyncIterator[Stack]:
    async with running(make_settings(servers), servers) as s:
        yield s


async def _customers(stack: Stack, query: str) -> list[dict[str, object]]:
    response = await stack.client.get("/admin/customers", params={"q": query}, headers=stack.admin_headers())
    rows: list[dict[str, object]] = response.json()["customers"]
    return rows


async def _talk(stack: Stack, customer: str, text: str) -> None:
    stack.wecom.world.add_customer_text(KF, customer, text)
    await stack.callback()
    await stack.settle()


@pytest.mark.parametrize(("method", "path", "body"), CONSOLE_ROUTES)
async def test_console_endpoints_refuse_without_the_token(
    stack: Stack, method: str, path: str, body: object
) -> None:
    await _talk(stack, "wmA", "你好")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        resp = await stack.client.request(method, path, json=body, headers=headers)
        assert resp.status_code == 401
        assert list(resp.json()) == ["error"]
        assert "wmA" not in resp.text


@pytest.mark.parametrize(("method", "path", "body"), CONSOLE_ROUTES)
async def test_console_endpoints_are_closed_when_no_token_is_configured(
    servers: Servers, method: str, path: str, body: object
) -> None:
    settings = dataclasses.replace(make_settings(servers), admin_token="")
    async with running(settings, servers) as stack:
        resp = await stack.client.request(method, path, json=body, headers={"Authorization": "Bearer "})
        assert resp.status_code == 403


async def test_overview_counts_what_status_counts(stack: Stack) -> None:
    await _talk(stack, "wmA", "你好")
    await _talk(stack, "wmB", "在吗")
    headers = stack.admin_headers()
    overview = (await stack.client.get("/admin/overview", headers=headers)).json()
    status = (await stack.client.get("/status", headers=headers)).json()
    assert overview["instance"] == status["instance"] != ""
    assert overview["windows"] == status["windows"]
    assert overview["windows"]["today"]["answered"] == status["counters"]["answered"] == 2
    assert overview["windows"]["last_hour"]["answered"] == 2
    assert overview["store"] == status["store"] and overview["version"] == status["version"]
    assert overview["wecom"]["ok"] is True and overview["dify"]["ok"] is True
    series = overview["per_minute"]
    assert len(series) == 60 and sum(point["answered"] for point in series) == 2
    assert series[-1]["dify_p50"] is not None and series[-1]["dify_p95"] >= series[-1]["dify_p50"]
    assert KF in overview["kf_accounts"]


async def test_overview_shows_the_dify_apps_status_reports(stack: Stack) -> None:
    stack.container.status().__dict__["_extra"] = lambda: {"dify_apps": {"default": {"limit": 4}}}
    overview = (await stack.client.get("/admin/overview", headers=stack.admin_headers())).json()
    assert overview["dify_apps"] == {"default": {"limit": 4}}


async def test_customers_are_listed_newest_first_and_found_by_id(stack: Stack) -> None:
    await _talk(stack, "wmAlice01", "你好")
    await _talk(stack, "wmBob02", "你好")
    await _talk(stack, "wmBob02", "还有一个问题")
    headers = stack.admin_headers()
    listed = (await stack.client.get("/admin/customers", headers=headers)).json()["customers"]
    assert [row["customer"] for row in listed] == ["wmBob02", "wmAlice01"]
    bob = listed[0]
    assert bob["open_kfid"] == KF and bob["turns"] == 2 and bob["messages"] == 2
    assert bob["session_owner"] == "bot" and bob["last_outcome"] == "answered"
    found = (await stack.client.get("/admin/customers", params={"q": "alice"}, headers=headers)).json()
    assert [row["customer"] for row in found["customers"]] == ["wmAlice01"]
    assert (await stack.client.get("/admin/customers?limit=x", headers=headers)).status_code == 400


async def test_a_customer_reset_from_the_console_starts_a_new_dify_conversation(stack: Stack) -> None:
    await _talk(stack, "wmA", "你好")
    headers = stack.admin_headers()
    detail = (await stack.client.get(f"/admin/customers/{KF}/wmA", headers=headers)).json()
    first = detail["conversation"]["conversation_id"]
    assert first in stack.dify.conversations
    assert [o["outcome"] for o in detail["outcomes"]] == ["answered"]
    reset = await stack.client.post(
        "/reset_conversation", json={"user_id": "wmA", "open_kfid": KF}, headers=headers
    )
    assert reset.status_code == 200
    assert (await stack.client.get(f"/admin/customers/{KF}/wmA", headers=headers)).json()[
        "conversation"
    ] is None
    await _talk(stack, "wmA", "再问一次")
    assert not stack.dify.chat_requests()[-1].json.get("conversation_id")
    after = (await stack.client.get(f"/admin/customers/{KF}/wmA", headers=headers)).json()
    assert after["conversation"]["conversation_id"] not in ("", first)


async def test_an_unknown_customer_is_404_and_ids_are_checked(stack: Stack) -> None:
    headers = stack.admin_headers()
    assert (await stack.client.get(f"/admin/customers/{KF}/wmNobody", headers=headers)).status_code == 404
    assert (await stack.client.get(f"/admin/customers/{KF}/wm%20x", headers=headers)).status_code == 400


async def test_problems_carry_the_hint_check_gives(stack: Stack) -> None:
    stack.dify.inject(Fault(status=401, body={"code": "unauthorized", "message": "bad key", "status": 401}))
    await _talk(stack, "wmA", "你好")
    stack.wecom.world.fail_next(
        "kf/send_msg", 60020, errmsg="not allow to access from your ip, from ip:1.2.3.4"
    )
    await _talk(stack, "wmB", "你好")
    problems = (await stack.client.get("/admin/problems", headers=stack.admin_headers())).json()["problems"]
    kinds = [p["kind"] for p in problems]
    assert "dify_error" in kinds and "wecom_errcode" in kinds
    assert kinds.index("wecom_errcode") < kinds.index("dify_error")  # newest first
    dify = next(p for p in problems if p["kind"] == "dify_error")
    assert dify["customer"] == "wmA" and dify["code"] == "unauthorized"
    assert dify["hint"] == dify_hint_for("unauthorized")
    wecom = next(p for p in problems if p["kind"] == "wecom_errcode")
    assert wecom["customer"] == "wmB" and wecom["hint"] == wecom_hint_for(60020)
    assert stack.settings.dify_api_key not in str(problems)


async def test_try_it_runs_the_real_core_and_splits_a_long_answer(stack: Stack) -> None:
    stack.dify.answer = lambda query, history: "很长的回答。" * 300
    headers = stack.admin_headers()
    sent_before = len(stack.wecom.world.sent)
    resp = await stack.client.post("/admin/try", json={"text": "讲讲", "session": SESSION}, headers=headers)
    assert resp.status_code == 200, resp.text
    bubbles = resp.json()["bubbles"]
    assert len(bubbles) >= 2 and all(b["kind"] == "text" for b in bubbles)
    assert "".join(b["text"] for b in bubbles).count("很长的回答") == 300
    assert all(b["bytes"] == len(b["text"].encode()) <= 2048 for b in bubbles)
    assert len(stack.wecom.world.sent) == sent_before  # nothing reached WeCom
    assert resp.headers["cache-control"] == "no-store"


async def test_try_it_reset_words_and_start_over(stack: Stack) -> None:
    headers = stack.admin_headers()
    await stack.client.post("/admin/try", json={"text": "你好", "session": SESSION}, headers=headers)
    first = stack.dify.chat_requests()[-1]
    reset_word = stack.container.options().reset_words[0]
    said = await stack.client.post(
        "/admin/try", json={"text": reset_word, "session": SESSION}, headers=headers
    )
    assert said.json()["bubbles"][0]["text"] == stack.container.options().texts.reset_done
    await stack.client.post("/admin/try", json={"text": "再来", "session": SESSION}, headers=headers)
    assert not stack.dify.chat_requests()[-1].json.get("conversation_id")
    assert first.json["user"] == stack.dify.chat_requests()[-1].json["user"]
    gone = await stack.client.post("/admin/try/reset", json={"session": SESSION}, headers=headers)
    assert gone.json() == {"session": SESSION, "reset": True}
    again = await stack.client.post("/admin/try/reset", json={"session": SESSION}, headers=headers)
    assert again.json()["reset"] is False


async def test_try_it_shows_the_welcome_menu_as_items(servers: Servers) -> None:
    servers.dify.opening_statement = "欢迎光临"
    servers.dify.suggested_questions = ("营业时间？", "怎么退货？")
    async with running(make_settings(servers), servers) as stack:
        resp = await stack.client.post(
            "/admin/try", json={"text": "你好", "session": SESSION}, headers=stack.admin_headers()
        )
        bubbles = resp.json()["bubbles"]
        menus = [b for b in bubbles if b["kind"] == "menu"]
        assert menus and [item["text"] for item in menus[0]["items"]] == ["营业时间？", "怎么退货？"]
        assert bubbles[-1]["text"] == "答：你好"


@pytest.mark.parametrize(
    "body",
    [
        {"text": "", "session": SESSION},
        {"text": "x" * 2001, "session": SESSION},
        {"text": "hi", "session": "short"},
        {"text": "hi", "session": "../../etc/passwd"},
        {"text": "hi", "session": SESSION, "open_kfid": 3},
        ["not", "an", "object"],
    ],
)
async def test_try_it_refuses_bad_requests(stack: Stack, body: object) -> None:
    resp = await stack.client.post("/admin/try", json=body, headers=stack.admin_headers())
    assert resp.status_code == 400 and "error" in resp.json()


async def test_the_page_is_served_with_a_strict_policy(stack: Stack) -> None:
    page = await stack.client.get("/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe" not in policy
    assert page.headers["x-frame-options"] == "DENY"
    assert "access-control-allow-origin" not in page.headers
    assert page.text.count('type="password"') == 1 and "<script>" not in page.text
    for name in ASSETS:
        asset = await stack.client.get(f"/console/{name}")
        assert asset.status_code == 200 and asset.headers["x-frame-options"] == "DENY"
    for name in ("..%2Fconsole_api.py", "console_api.py", "%2e%2e", "index.htm"):
        assert (await stack.client.get(f"/console/{name}")).status_code == 404
    redirect = await stack.client.get("/console/", follow_redirects=False)
    assert redirect.status_code == 308 and redirect.headers["location"] == "/console"


def test_the_console_is_small_and_loads_nothing_from_elsewhere() -> None:
    files = sorted(CONSOLE_DIR.iterdir())
    assert {f.name for f in files} == set(ASSETS)
    assert sum(f.stat().st_size for f in files) < 200 * 1024
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert "http://" not in text.replace("http://www.w3.org/", "") and "https://" not in text
        assert "innerHTML" not in text and "eval(" not in text


async def test_with_an_admin_port_the_console_is_served_there_only(stack: Stack) -> None:
    from adapters.inbound.server import split_by_port

    app = split_by_port(stack.app, admin_port=9001)
    for port, expected in ((9001, 200), (8000, 404)):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://kf-dify.test:{port}") as client:
            assert (await client.get("/console")).status_code == expected
            assert (await client.get("/console/console.js")).status_code == expected
            overview = await client.get("/admin/overview", headers=stack.admin_headers())
            assert overview.status_code == expected


def test_every_text_of_the_console_is_in_its_one_translation_file() -> None:
    import re

    han = re.compile(r"[\u4e00-\u9fff]")
    for name in ASSETS:
        if name != "i18n.js":
            assert not han.search((CONSOLE_DIR / name).read_text(encoding="utf-8")), name
    source = (CONSOLE_DIR / "i18n.js").read_text(encoding="utf-8")
    zh_part, en_part = source.split("\n  en: {", 1)
    keys = re.compile(r"^    (\w+): ", re.MULTILINE)
    zh_keys, en_keys = (
        keys.findall(zh_part.split("\n  zh: {", 1)[1]),
        keys.findall(en_part.split("\n};", 1)[0]),
    )
    assert zh_keys and sorted(zh_keys) == sorted(en_keys)
    used = set(re.findall(r'data-i18n(?:-placeholder)?="(\w+)"', (CONSOLE_DIR / "index.html").read_text()))
    used |= set(re.findall(r'\bt\("(\w+)"', (CONSOLE_DIR / "console.js").read_text()))
    assert used and used <= set(zh_keys)


async def test_a_customers_nickname_and_entry_context_show_in_the_list_and_the_detail(stack: Stack) -> None:
    stack.wecom.world.add_customer_profile("wmCarol03", nickname="卡罗尔", gender=2)
    stack.wecom.world.add_enter_session(KF, "wmCarol03", scene="product", scene_param="A-42", welcome=False)
    await _talk(stack, "wmCarol03", "这个有货吗")
    headers = stack.admin_headers()
    # The profile is fetched in the background (batched kf/customer/batchget): wait until it is known.
    with anyio.fail_after(30):
        while not (rows := await _customers(stack, "carol"))[0]["nickname"]:
            await anyio.sleep(0.05)

    (row,) = rows
    detail = (await stack.client.get(f"/admin/customers/{KF}/wmCarol03", headers=headers)).json()

    assert row["nickname"] == "卡罗尔"
    assert detail["nickname"] == "卡罗尔"
    assert detail["profile"]["gender"] == "女"
    assert (detail["profile"]["entry"]["scene"], detail["profile"]["entry"]["scene_param"]) == (
        "product",
        "A-42",
    )
