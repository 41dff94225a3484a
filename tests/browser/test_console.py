"""The operator console in headless Chromium, against the service running as a process.

KF_SCREENSHOTS=1 also writes the README's screenshots (docs/console/*.png); CI leaves them alone. Chinese
needs a CJK font on the machine taking them (Debian: fonts-wqy-microhei).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import Service
from tests.support.service_process import wait_for
from tests.support.stack import ADMIN_TOKEN

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def _shoot(page: Any, name: str, *, full_page: bool = True) -> None:
    if os.environ.get("KF_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)


@pytest.fixture
def page(browser: Any, service: Service) -> Iterator[Any]:
    context = browser.new_context(viewport=DESKTOP, locale="zh-CN", device_scale_factor=1)
    opened = context.new_page()
    opened.set_default_timeout(20_000)
    try:
        yield opened
    finally:
        context.close()


def _sign_in(page: Any, service: Service, token: str = ADMIN_TOKEN) -> None:
    page.goto(service.url + "/console")
    page.fill("#token", token)
    page.click("#sign-in-form button[type=submit]")


def _signed_in(page: Any, service: Service) -> None:
    _sign_in(page, service)
    page.wait_for_selector("#app:not([hidden])")
    page.wait_for_selector("[data-counter]")


def test_a_wrong_token_is_refused_and_nothing_is_shown(page: Any, service: Service) -> None:
    service.customer_says("wmSecretCustomer", "你好")
    _sign_in(page, service, token="not-the-admin-token")
    page.wait_for_selector("#sign-in-error:not([hidden])")
    assert page.is_hidden("#app")
    assert page.locator("[data-counter]").count() == 0
    assert "wmSecretCustomer" not in page.content()
    assert page.evaluate("Object.keys(sessionStorage)") == []
    assert page.evaluate("document.cookie") == ""
    assert page.locator("input[type=password]").count() == 1
    assert "token" not in page.url and ADMIN_TOKEN not in page.url


def test_the_overview_counters_equal_status_and_refresh_by_themselves(page: Any, service: Service) -> None:
    service.customer_says("wmOverview1", "你好")
    service.customer_says("wmOverview2", "营业时间？")
    _signed_in(page, service)
    page.wait_for_selector("#chart-answered svg rect.bar")
    status = service.status()
    cells = page.locator("[data-counter]")
    assert cells.count() == 12
    for index in range(cells.count()):
        cell = cells.nth(index)
        name, window = cell.get_attribute("data-counter"), cell.get_attribute("data-window")
        assert int(cell.inner_text()) == status["windows"][window][name], (name, window)
    today = page.locator('[data-counter="answered"][data-window="today"]')
    assert int(today.inner_text()) == status["counters"]["answered"]  # one process, started today
    assert page.inner_text("#instance") == status["instance"]
    _shoot(page, "overview")
    page.evaluate("window.__notReloaded = true")
    service.customer_says("wmOverview3", "还在吗")
    expected = str(service.status()["windows"]["today"]["answered"])
    page.wait_for_function(
        "n => document.querySelector('[data-counter=answered][data-window=today]').textContent === n",
        arg=expected,
    )
    assert page.evaluate("window.__notReloaded") is True


def test_a_list_answered_after_a_newer_search_is_not_shown(page: Any, service: Service) -> None:
    service.customer_says("wmLateOne", "你好")
    service.customer_says("wmLateTwo", "你好")
    _signed_in(page, service)
    held: list[Any] = []

    def hold(route: Any) -> None:
        held.append(route)

    page.route("**/admin/customers?q=", hold)  # the tab's first, unfiltered list: held back
    page.click('[data-tab="customers"]')
    page.fill("#search", "LateTwo")
    page.click("#search-form button[type=submit]")
    page.wait_for_selector('#customers [data-query="LateTwo"] tr[data-customer="wmLateTwo"]')
    assert len(held) == 1
    with page.expect_event("requestfinished", lambda request: request.url.endswith("/admin/customers?q=")):
        held[0].continue_()
    # A request the page makes after the late answer was read completes after the page handled that answer.
    page.evaluate("() => fetch('/healthz').then((response) => response.text())")
    assert page.locator('#customers [data-query=""]').count() == 0
    assert page.locator("tr[data-customer]").count() == 1


def test_search_a_customer_and_reset_the_conversation(page: Any, service: Service) -> None:
    service.customer_says("wmResetMe", "你好")
    before = service.admin("GET", "/get_conversation", params={"user_id": "wmResetMe"}).json()
    _signed_in(page, service)
    page.click('[data-tab="customers"]')
    page.fill("#search", "ResetMe")
    page.click("#search-form button[type=submit]")
    # The search's own list: the tab's first (unfiltered) list may be shown, or answered, before it.
    page.wait_for_selector('#customers [data-query="ResetMe"] tr[data-customer="wmResetMe"]')
    assert page.locator("tr[data-customer]").count() == 1
    page.click('tr[data-customer="wmResetMe"]')
    page.wait_for_selector("#conversation-id")
    assert page.inner_text("#conversation-id") == before["conversation_id"]
    _shoot(page, "customers")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click('[data-action="reset"]')
    page.wait_for_function("() => document.querySelector('#reset-result')?.textContent.length > 0")
    assert page.inner_text("#conversation-id") != before["conversation_id"]
    assert service.admin("GET", "/get_conversation", params={"user_id": "wmResetMe"}).status_code == 404
    service.customer_says("wmResetMe", "又来了")
    asked = [r for r in service.servers.dify.chat_requests() if r.json.get("user", "").endswith("wmResetMe")]
    assert asked[-1].json.get("conversation_id") in (None, "")
    after = service.admin("GET", "/get_conversation", params={"user_id": "wmResetMe"}).json()
    assert after["conversation_id"] != before["conversation_id"]


def test_a_dismissed_reset_changes_nothing(page: Any, service: Service) -> None:
    service.customer_says("wmKeepMe", "你好")
    _signed_in(page, service)
    page.click('[data-tab="customers"]')
    page.click('tr[data-customer="wmKeepMe"]')
    page.wait_for_selector("#conversation-id")
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.click('[data-action="reset"]')
    assert service.admin("GET", "/get_conversation", params={"user_id": "wmKeepMe"}).status_code == 200


def test_clear_needs_the_typed_confirmation_word(page: Any, service: Service) -> None:
    service.customer_says("wmClearMe", "你好")
    _signed_in(page, service)
    page.click('[data-action="clear"]')
    page.fill("#clear-word", "clear")
    page.click('[data-action="clear-confirm"]')
    page.wait_for_function("() => document.querySelector('#clear-result').textContent.length > 0")
    assert service.admin("GET", "/get_conversation", params={"user_id": "wmClearMe"}).status_code == 200
    page.fill("#clear-word", "清空")
    page.click('[data-action="clear-confirm"]')
    page.wait_for_selector("#clear-form[hidden]", state="attached")
    wait_for(
        lambda: service.admin("GET", "/get_conversation", params={"user_id": "wmClearMe"}).status_code == 404,
        what="the clear",
    )


def test_try_it_shows_a_long_answer_split_into_bubbles(page: Any, service: Service) -> None:
    dify = service.servers.dify
    original = dify.answer
    dify.answer = lambda query, history: "这是一个很长的回答，需要拆成几条微信消息。" * 140
    sent_to_wecom = len(service.servers.wecom.world.sent)
    try:
        _signed_in(page, service)
        page.click('[data-tab="try"]')
        page.fill("#try-text", "请详细介绍一下")
        page.click("#try-form button[type=submit]")
        page.wait_for_selector(".bubble.bot[data-kind]")
        bubbles = page.locator(".bubble.bot[data-kind] .text")
        assert bubbles.count() >= 2
        joined = "".join(bubbles.nth(i).inner_text() for i in range(bubbles.count()))
        assert joined.count("这是一个很长的回答") == 140
        assert page.locator(".bubble.me").inner_text() == "请详细介绍一下"
        _shoot(page, "try-it")
    finally:
        dify.answer = original
    assert len(service.servers.wecom.world.sent) == sent_to_wecom  # nothing reached WeCom


def test_problems_are_listed_with_their_hints(page: Any, service: Service) -> None:
    from tests.support.dify_server import Fault

    service.servers.dify.inject(
        Fault(status=401, body={"code": "unauthorized", "message": "bad key", "status": 401})
    )
    service.customer_says("wmProblem", "你好")
    _signed_in(page, service)
    page.click('[data-tab="problems"]')
    page.wait_for_selector('li[data-kind="dify_error"]')
    item = page.locator('li[data-kind="dify_error"]').first
    assert "wmProblem" in item.inner_text() and "DIFY_API_KEY" in item.inner_text()
    _shoot(page, "problems")


def test_one_switch_turns_the_console_english(page: Any, service: Service) -> None:
    _signed_in(page, service)
    assert page.inner_text('[data-tab="overview"]') == "概览"
    page.click("#lang")
    assert page.inner_text('[data-tab="overview"]') == "Overview"
    assert page.inner_text('[data-tab="problems"]') == "Problems"
    assert page.evaluate("document.documentElement.lang") == "en"
    assert "Answered" in page.inner_text("#counters")
    _shoot(page, "overview-en")
    page.click('[data-tab="customers"]')
    page.wait_for_selector("#customers table, #customers p")
    assert "Customer" in page.inner_text("#customers") or "No recent" in page.inner_text("#customers")
    page.click("#lang")
    assert page.inner_text('[data-tab="customers"]') == "会话"


def test_sign_out_forgets_the_token(page: Any, service: Service) -> None:
    _signed_in(page, service)
    assert page.evaluate("Object.values(sessionStorage)").count(ADMIN_TOKEN) == 1
    page.click("#sign-out")
    page.wait_for_selector("#sign-in:not([hidden])")
    assert ADMIN_TOKEN not in page.evaluate("JSON.stringify(sessionStorage)")
    assert page.locator("[data-counter]").count() == 0
    page.reload()
    page.wait_for_selector("#sign-in:not([hidden])")
    assert page.is_hidden("#app")


def test_the_console_fits_a_phone(browser: Any, service: Service) -> None:
    service.customer_says("wmPhone", "你好")
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    try:
        page = context.new_page()
        page.set_default_timeout(20_000)
        _signed_in(page, service)
        page.wait_for_selector("#chart-answered svg")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        _shoot(page, "phone-overview")
        page.tap('[data-tab="customers"]')
        page.wait_for_selector('tr[data-customer="wmPhone"]')
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.tap('[data-tab="try"]')
        page.fill("#try-text", "你好")
        page.tap("#try-form button[type=submit]")
        page.wait_for_selector(".bubble.bot[data-kind]")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        _shoot(page, "phone-try-it", full_page=False)
    finally:
        context.close()
