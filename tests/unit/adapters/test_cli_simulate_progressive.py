"""`simulate` shows each bubble as the bot sends it (a long answer's first parts while Dify still writes) and
suggestion menus as numbered items the operator taps by typing the number."""

from __future__ import annotations

import asyncio
import io

from adapters.inbound.cli_simulate import format_menu, run_simulate


class Bot:
    """Answers in two parts, the second only once the first is on screen; then a menu of follow-ups."""

    def __init__(self, out: io.StringIO) -> None:
        self.out = out
        self.texts: list[str] = []
        self.menus: list[tuple[str, tuple[tuple[str, str], ...]]] = []
        self.pending: list[tuple[str, str]] = []  # (text, menu_id)
        self.taps: list[tuple[str, str]] = []

    def push_text(self, text: str) -> None:
        self.pending.append((text, ""))

    def push_tap(self, text: str, menu_id: str) -> None:
        self.taps.append((text, menu_id))
        self.pending.append((text, menu_id))

    def notify(self) -> None:
        pass

    async def idle(self) -> None:
        while self.pending:
            text, menu_id = self.pending.pop(0)
            if menu_id:
                self.texts.append(f"答：{text}（点选 {menu_id}）")
                continue
            self.texts.append(f"第一部分：{text}")
            for _ in range(2000):  # the second part waits until the first is on screen
                if "第一部分" in self.out.getvalue():
                    break
                await asyncio.sleep(0.005)
            self.texts.append("第二部分")
            self.menus.append(("您可能还想问：", (("sq0_x", "保修多久？"), ("sq1_x", "怎么寄修？"))))

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def simulate(lines: str) -> tuple[Bot, str]:
    out = io.StringIO()
    bot = Bot(out)
    code = run_simulate(
        push_text=bot.push_text,
        sent_texts=lambda: list(bot.texts),
        notify=bot.notify,
        idle=bot.idle,
        start=bot.start,
        stop=bot.stop,
        app_label="售后助手",
        stdin=io.StringIO(lines),
        stdout=out,
        sent_menus=lambda: list(bot.menus),
        push_tap=bot.push_tap,
    )
    assert code == 0
    return bot, out.getvalue()


def test_a_bubble_shows_while_the_bot_still_answers() -> None:
    _, output = simulate("讲讲保修\n")

    assert "[bot 1/… · " in output  # printed before the answer was complete
    assert "[bot 2/2 · " in output
    assert output.index("第一部分") < output.index("第二部分")


def test_a_menu_shows_numbered_items_and_a_number_taps_one() -> None:
    bot, output = simulate("讲讲保修\n2\n")

    assert "  1) 保修多久？\n  2) 怎么寄修？" in output
    assert bot.taps == [("怎么寄修？", "sq1_x")]
    assert "答：怎么寄修？（点选 sq1_x）" in output


def test_a_number_without_a_menu_is_just_text() -> None:
    bot, output = simulate("3\n")

    assert bot.taps == []
    assert "第一部分：3" in output


def test_format_menu() -> None:
    assert format_menu(("还想问：", (("a", "一"),))) == (
        "[bot 菜单 / menu · 1 items]\n还想问：\n  1) 一\n（输入编号即点选 / type a number to tap）\n\n"
    )
