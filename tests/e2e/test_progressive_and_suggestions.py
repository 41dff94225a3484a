"""Through the webhook, with the real adapters against the local WeCom and Dify servers: a long answer's
first parts reach the customer while Dify still streams; the app's suggested questions follow as a menu."""

from __future__ import annotations

import pytest

from domain.replies import TEXT_LIMIT_BYTES, split_reply
from tests.support.stack import KF, Servers, make_settings, running

pytestmark = pytest.mark.anyio


def long_answer() -> str:
    # About 6 KB: eight paragraphs of twelve sentences.
    return "\n\n".join(
        "".join(f"第{i}段第{j}句，这里说明一项具体的注意事项。" for j in range(12)) for i in range(8)
    )


def squeezed(text: str) -> str:
    return "".join(text.split())


async def test_the_first_parts_reach_the_customer_while_dify_still_streams(servers: Servers) -> None:
    answer = long_answer()
    servers.dify.answer = lambda q, h: answer
    servers.dify.chunk_size = 20
    seen: list[int] = []

    def a_part_is_out() -> bool:
        out = sum(1 for s in servers.wecom.world.sent if s.customer.external_userid == "wmP")
        if out:
            seen.append(out)
        return out > 0

    # Near the end the stream waits until a part reached WeCom (at most hang_limit): only progressive
    # sending lets it go on at once.
    servers.dify.hold = (len(answer) // 20 - 3, a_part_is_out)
    servers.dify.hang_limit = 15
    async with running(make_settings(servers), servers) as stack:
        stack.wecom.world.add_customer_text(KF, "wmP", "请详细说明")
        await stack.callback()
        await stack.settle(timeout=30)
        replies = stack.replies_to("wmP")
        counters = stack.container.telemetry().counters

    assert seen  # the stream went on because a part was already out
    assert 2 <= len(replies) <= 5
    assert all(len(r.encode()) <= TEXT_LIMIT_BYTES for r in replies)
    assert squeezed("".join(replies)) == squeezed(answer)
    assert counters["parts_sent_progressively"] >= 1


async def test_with_output_moderation_on_the_answer_goes_out_whole(servers: Servers) -> None:
    answer = long_answer()
    servers.dify.answer = lambda q, h: answer
    servers.dify.moderation = True
    async with running(make_settings(servers), servers) as stack:
        stack.wecom.world.add_customer_text(KF, "wmMod", "请详细说明")
        await stack.callback()
        await stack.settle()
        replies = stack.replies_to("wmMod")
        counters = stack.container.telemetry().counters

    assert replies == split_reply(answer)
    assert "parts_sent_progressively" not in counters


async def test_suggested_questions_follow_as_a_menu_and_a_tap_is_answered(servers: Servers) -> None:
    servers.dify.suggest = lambda query, answer: [f"{query}要多久？", "还有别的办法吗？"]
    async with running(make_settings(servers), servers) as stack:
        world = stack.wecom.world
        world.add_customer_text(KF, "wmS", "修手机")
        await stack.callback()
        await stack.settle()
        [menu] = world.sent_menus
        item_id, content = menu.menu[0]
        world.add_customer_text(KF, "wmS", content, menu_id=item_id)
        await stack.callback()
        await stack.settle()
        replies = stack.replies_to("wmS")
        counters = stack.container.telemetry().counters

    assert menu.head == "您可能还想问："
    assert [c for _, c in menu.menu] == ["修手机要多久？", "还有别的办法吗？"]
    assert replies == ["答：修手机", "答：修手机要多久？"]
    assert counters["suggestion_menus_sent"] == 2
    assert counters["suggestions_tapped"] == 1


async def test_suggestions_off_in_the_settings_sends_no_menu(servers: Servers) -> None:
    servers.dify.suggest = lambda query, answer: ["还有别的办法吗？"]
    async with running(make_settings(servers, suggestions=False), servers) as stack:
        stack.wecom.world.add_customer_text(KF, "wmNo", "修手机")
        await stack.callback()
        await stack.settle()
        replies = stack.replies_to("wmNo")

    assert replies == ["答：修手机"]
    assert stack.wecom.world.sent_menus == []
    assert not [r for r in servers.dify.requests if r.path.endswith("/suggested")]
