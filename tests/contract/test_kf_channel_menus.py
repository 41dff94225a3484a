# ruff: noqa: F811  (the fixtures come from test_kf_channel.py and are named as parameters)
"""The `KfChannel` contract for `send_menu` (a msgmenu of click items through `kf/send_msg`): the fake and the
real adapter over HTTP against the emulator behave the same (docs/wecom-kf.md §6.3)."""

from __future__ import annotations

import pytest

from adapters.outbound.fake_wecom import SentMenu
from application.errors import WeComError
from application.ports import KfChannel
from tests.contract.test_kf_channel import (  # noqa: F401 (fixtures)
    ALICE,
    KF,
    KfHarness,
    channel,
    kf,
    served_wecom,
)

pytestmark = pytest.mark.anyio

ITEMS = [("sq0_abc", "保修多久？"), ("sq1_abc", "怎么寄修？")]


async def test_a_menu_goes_out_as_click_items_under_its_head(kf: KfHarness, channel: KfChannel) -> None:
    kf.customer_says(ALICE, "你好")

    msgid = await channel.send_menu(ALICE, "您可能还想问：", ITEMS, msgid="menu_1")

    assert msgid == "menu_1"
    assert kf.world.sent_menus == [SentMenu(ALICE, "您可能还想问：", tuple(ITEMS), "menu_1")]


async def test_a_tapped_item_comes_back_as_a_text_with_its_menu_id(kf: KfHarness, channel: KfChannel) -> None:
    kf.customer_says(ALICE, "你好")
    await channel.send_menu(ALICE, "您可能还想问：", ITEMS, msgid="menu_2")
    kf.world.add_customer_text(KF, ALICE.external_userid, "保修多久？", menu_id="sq0_abc")

    messages, _ = await kf.drain()

    tapped = messages[-1]
    assert (tapped.msgtype, tapped.text, tapped.menu_id) == ("text", "保修多久？", "sq0_abc")


async def test_menus_share_the_five_message_quota(kf: KfHarness, channel: KfChannel) -> None:
    kf.customer_says(ALICE, "hi")
    for part in range(4):
        await channel.send_text(ALICE, f"part {part}", msgid=f"t{part}")
    await channel.send_menu(ALICE, "还想问：", ITEMS, msgid="m0")

    with pytest.raises(WeComError) as caught:
        await channel.send_menu(ALICE, "还想问：", ITEMS, msgid="m1")
    assert caught.value.errcode == 95001


async def test_more_than_ten_items_are_refused(kf: KfHarness, channel: KfChannel) -> None:
    kf.customer_says(ALICE, "hi")
    items = [(f"id{i}", f"问题{i}") for i in range(11)]

    with pytest.raises(WeComError) as caught:
        await channel.send_menu(ALICE, "还想问：", items, msgid="m_many")
    assert caught.value.errcode == 95008


async def test_an_item_longer_than_128_bytes_is_refused(kf: KfHarness, channel: KfChannel) -> None:
    kf.customer_says(ALICE, "hi")

    with pytest.raises(WeComError) as caught:
        await channel.send_menu(ALICE, "还想问：", [("long", "问" * 43)], msgid="m_long")
    assert caught.value.errcode
    assert kf.world.sent_menus == []


async def test_a_menu_into_a_human_session_is_refused(kf: KfHarness, channel: KfChannel) -> None:
    kf.customer_says(ALICE, "hi")
    kf.world.set_service_state(ALICE, 3, "zhangsan")

    with pytest.raises(WeComError) as caught:
        await channel.send_menu(ALICE, "还想问：", ITEMS, msgid="m_human")
    assert caught.value.errcode == 95018
