"""Suggested questions after an answer, over the fake-adapter container: a menu after the answer when the app
and the quota allow, never at the cost of answer text; a tapped item is answered like a text."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

import bootstrap
from adapters.outbound.fake_dify import FakeChatEngine
from adapters.outbound.fake_wecom import KfWorld
from application.errors import ChatEngineError
from application.suggestions import MAX_ITEM_BYTES, is_suggestion_tap, menu_items
from domain.chat import AppParameters
from domain.messages import InboundMessage, Origin
from tests.support.containers import fake_application, unit_settings

pytestmark = pytest.mark.anyio
KF = "wkSugg"
FOLLOW_UPS = ["保修多久？", "怎么寄修？", "保修多久？", "  "]


def app_with(
    *, enabled: bool = True, **settings: object
) -> tuple[bootstrap.Application, KfWorld, FakeChatEngine]:
    app = fake_application(unit_settings(**settings))
    engine = app.adapters.engine()
    engine.app_parameters = AppParameters(suggestions_after_answer=enabled)
    engine.suggestions = lambda query, answer: FOLLOW_UPS
    return app, app.adapters.world(), engine


async def run(app: bootstrap.Application) -> None:
    app.dispatcher().notify(KF, "tok")
    await asyncio.wait_for(app.dispatcher().idle(), 20)


def texts(world: KfWorld, customer: str) -> list[str]:
    return [s.text for s in world.sent if s.customer.external_userid == customer]


async def test_the_app_s_questions_follow_the_answer_as_a_menu() -> None:
    app, world, engine = app_with()
    world.add_customer_text(KF, "wmAsk", "手机坏了")
    await run(app)

    assert texts(world, "wmAsk") == ["答：手机坏了"]
    [menu] = world.sent_menus
    assert menu.head == "您可能还想问："
    assert [content for _, content in menu.menu] == ["保修多久？", "怎么寄修？"]  # blanks and repeats dropped
    assert engine.suggestion_requests == [(engine.questions[0].user, menu_request_id(engine))]
    assert app.telemetry().counters["suggestion_menus_sent"] == 1


def menu_request_id(engine: FakeChatEngine) -> str:
    return engine.suggestion_requests[0][1]


async def test_a_tapped_item_is_answered_like_a_text_and_counted() -> None:
    app, world, engine = app_with()
    world.add_customer_text(KF, "wmTap", "手机坏了")
    await run(app)
    item_id, content = world.sent_menus[0].menu[0]

    world.add_customer_text(KF, "wmTap", content, menu_id=item_id)
    await run(app)

    assert engine.questions[-1].query == "保修多久？"
    assert texts(world, "wmTap")[-1] == "答：保修多久？"
    assert app.telemetry().counters["suggestions_tapped"] == 1


async def test_no_menu_when_the_answer_used_the_whole_quota() -> None:
    app, world, engine = app_with()
    engine.responder = lambda q, h: "\n\n".join("很长的回答内容。" * 80 for _ in range(12))
    world.add_customer_text(KF, "wmFull", "全部告诉我")
    await run(app)

    assert len(texts(world, "wmFull")) == 5
    assert world.sent_menus == []
    assert engine.suggestion_requests == []


async def test_no_menu_when_the_app_has_the_feature_off() -> None:
    app, world, engine = app_with(enabled=False)
    world.add_customer_text(KF, "wmOff", "你好")
    await run(app)

    assert texts(world, "wmOff") == ["答：你好"]
    assert world.sent_menus == []
    assert engine.suggestion_requests == []


async def test_suggestions_off_in_the_settings_wins_over_the_app() -> None:
    app, world, engine = app_with(suggestions=False)
    world.add_customer_text(KF, "wmCfg", "你好")
    await run(app)

    assert texts(world, "wmCfg") == ["答：你好"]
    assert world.sent_menus == []
    assert engine.suggestion_requests == []


async def test_a_failure_to_fetch_the_questions_costs_only_the_menu() -> None:
    app, world, engine = app_with()
    engine.fail_next_media("suggested", ChatEngineError("internal_server_error", "boom", status=500))
    world.add_customer_text(KF, "wmFail", "你好")
    await run(app)

    assert texts(world, "wmFail") == ["答：你好"]
    assert world.sent_menus == []
    assert app.telemetry().counters["answered"] == 1


def test_items_fit_wecom_s_limits_and_carry_recognisable_ids() -> None:
    message = InboundMessage(
        msgid="m1", open_kfid=KF, external_userid="wmX", send_time=1, origin=Origin.CUSTOMER, msgtype="text"
    )
    items = menu_items(message, [f"问题{i}" for i in range(12)] + ["长" * 100])

    assert len(items) == 10
    assert all(len(content.encode()) <= MAX_ITEM_BYTES for _, content in items)
    tapped = dataclasses.replace(message, msgid="m2", menu_id=items[3][0])
    assert is_suggestion_tap(tapped)
    assert not is_suggestion_tap(dataclasses.replace(message, menu_id="human"))
    assert menu_items(message, ["长" * 100])[0][1] == "长" * (MAX_ITEM_BYTES // 3)


def test_the_setting_reaches_the_options() -> None:
    assert fake_application(unit_settings(suggestions=False)).options().suggestions is False
    assert fake_application(unit_settings()).options().suggestions is True
