from __future__ import annotations

import asyncio
import dataclasses
import io
import re
import threading
from collections.abc import Callable, Sequence
from typing import SupportsIndex

import pytest

import bootstrap
from adapters.inbound.cli_simulate import run_simulate
from adapters.inbound.config_file import Settings
from application.options import ReplyTexts
from tests.support.dify_server import FakeDifyServer, Turn
from tests.support.http_server import serve

# "of" is "…" for a bubble shown while the bot still answers (a long answer's early parts): parsed as 0.
BUBBLE = re.compile(r"^\[bot (\d+)/(\d+|…) · (\d+) bytes\]$")


class FakeBot:
    """The callables run_simulate drives, over a queue: idle() answers what was pushed and notified."""

    def __init__(self, responder: Callable[[str], list[str]]) -> None:
        self.responder = responder
        self.queue: list[str] = []
        self.sent: list[str] = []
        self.pending_notify = False
        self.calls: list[str] = []

    def push_text(self, text: str) -> None:
        self.calls.append(f"push {text}")
        self.queue.append(text)

    def sent_texts(self) -> list[str]:
        return list(self.sent)

    def notify(self) -> None:
        self.calls.append("notify")
        self.pending_notify = True

    async def idle(self) -> None:
        self.calls.append("idle")
        if not self.pending_notify:
            return  # like the real core: nothing happens until a callback says so
        self.pending_notify = False
        while self.queue:
            text = self.queue.pop(0)
            await asyncio.sleep(0)
            self.sent.extend(self.responder(text))

    async def start(self) -> None:
        self.calls.append("start")

    async def stop(self) -> None:
        self.calls.append("stop")


def echo(text: str) -> list[str]:
    return [f"答：{text}"]


def simulate(bot: FakeBot, stdin: io.StringIO, app_label: str = "售后助手 (chat)") -> tuple[int, str]:
    out = io.StringIO()
    code = run_simulate(
        push_text=bot.push_text,
        sent_texts=bot.sent_texts,
        notify=bot.notify,
        idle=bot.idle,
        start=bot.start,
        stop=bot.stop,
        app_label=app_label,
        stdin=stdin,
        stdout=out,
    )
    return code, out.getvalue()


def bubbles(output: str) -> list[tuple[int, int, int, str]]:
    """(position, of, bytes, text) for every bubble printed."""
    lines = output.split("\n")
    found: list[tuple[int, int, int, str]] = []
    for i, line in enumerate(lines):
        match = BUBBLE.match(line)
        if match:
            position, of, size = (int(g) if g != "…" else 0 for g in match.groups())
            body: list[str] = []
            for following in lines[i + 1 :]:
                if BUBBLE.match(following):
                    break
                body.append(following)
            text = "\n".join(body).removesuffix("\n\n").rstrip("\n")
            found.append((position, of, size, text))
    return found


def test_the_banner_names_the_app_and_how_to_leave() -> None:
    code, output = simulate(FakeBot(echo), io.StringIO(""))

    banner = output.split("\n\n")[0]
    assert code == 0
    assert "售后助手 (chat)" in banner
    assert "/quit" in banner
    assert "对话" in banner and "talking to" in banner
    assert "重置" in banner


def test_each_reply_is_printed_as_a_bubble_with_its_size() -> None:
    bot = FakeBot(echo)

    code, output = simulate(bot, io.StringIO("你好\n"))

    assert code == 0
    assert bubbles(output) == [(1, 1, len("答：你好".encode()), "答：你好")]
    assert bot.calls == ["start", "push 你好", "notify", "idle", "stop"]


def test_a_split_answer_shows_every_message() -> None:
    bot = FakeBot(lambda text: ["第一段", "第二段 second", "third"])

    _, output = simulate(bot, io.StringIO("long question\n"))

    assert [(p, n, t) for p, n, _, t in bubbles(output)] == [
        (1, 3, "第一段"),
        (2, 3, "第二段 second"),
        (3, 3, "third"),
    ]
    assert "[bot 2/3 · 16 bytes]" in output


def test_only_the_new_texts_of_each_turn_are_printed() -> None:
    bot = FakeBot(echo)
    bot.sent.append("sent before the session started")

    _, output = simulate(bot, io.StringIO("one\ntwo\n"))

    assert [t for *_, t in bubbles(output)] == ["答：one", "答：two"]
    assert "sent before" not in output


def test_multiline_answers_stay_in_one_bubble() -> None:
    bot = FakeBot(lambda text: ["line 1\n\nline 3"])

    _, output = simulate(bot, io.StringIO("q\n"))

    assert bubbles(output) == [(1, 1, 14, "line 1\n\nline 3")]


def test_a_turn_without_reply_says_so() -> None:
    bot = FakeBot(lambda text: [])

    _, output = simulate(bot, io.StringIO("hello\n"))

    assert "no reply" in output
    assert bubbles(output) == []


def test_empty_lines_are_skipped() -> None:
    bot = FakeBot(echo)

    _, output = simulate(bot, io.StringIO("\n   \nhi\n\n"))

    assert [c for c in bot.calls if c.startswith("push")] == ["push hi"]
    assert len(bubbles(output)) == 1


@pytest.mark.parametrize("word", ["/quit", "/exit", "/QUIT"])
def test_quit_words_end_the_session_and_stop_the_service(word: str) -> None:
    bot = FakeBot(echo)

    code, output = simulate(bot, io.StringIO(f"first\n{word}\nnever read\n"))

    assert code == 0
    assert [c for c in bot.calls if c.startswith("push")] == ["push first"]
    assert bot.calls[-1] == "stop"
    assert "never read" not in output


def test_end_of_input_ends_the_session() -> None:
    bot = FakeBot(echo)

    code, _ = simulate(bot, io.StringIO("only line without newline"))

    assert code == 0
    assert bot.calls == ["start", "push only line without newline", "notify", "idle", "stop"]


def test_piped_input_gets_no_prompt() -> None:
    _, output = simulate(FakeBot(echo), io.StringIO("hi\n"))

    assert "you> " not in output


def test_a_terminal_gets_a_prompt() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    _, output = simulate(FakeBot(echo), Terminal("hi\n"))

    assert output.count("you> ") == 2  # before "hi" and before end of input


def test_an_error_in_a_turn_is_shown_and_the_session_goes_on() -> None:
    class Failing(FakeBot):
        async def idle(self) -> None:
            if self.queue and self.queue[0] == "boom":
                self.queue.clear()
                raise RuntimeError("the core broke")
            await super().idle()

    bot = Failing(echo)

    code, output = simulate(bot, io.StringIO("boom\nfine\n"))

    assert code == 0
    assert "RuntimeError: the core broke" in output
    assert [t for *_, t in bubbles(output)] == ["答：fine"]
    assert bot.calls[-1] == "stop"


def test_a_failing_start_still_stops_and_returns_1() -> None:
    class NoStart(FakeBot):
        async def start(self) -> None:
            await super().start()
            raise ConnectionError("cannot start")

    bot = NoStart(echo)

    code, output = simulate(bot, io.StringIO("hi\n"))

    assert code == 1
    assert "cannot start" in output
    assert bot.calls == ["start", "stop"]


def test_waiting_for_input_does_not_block_the_event_loop() -> None:
    """The background task must run while the REPL waits for a line that only it can release."""
    released = threading.Event()

    class GatedInput(io.StringIO):
        def readline(self, size: SupportsIndex | None = -1, /) -> str:  # type: ignore[override]
            if not released.wait(timeout=5):
                return ""  # the loop was blocked: end the session instead of hanging the test
            return super().readline()

    class Background(FakeBot):
        async def start(self) -> None:
            await super().start()

            async def release_soon() -> None:
                await asyncio.sleep(0.01)
                released.set()

            self.task = asyncio.create_task(release_soon())

    bot = Background(echo)

    _, output = simulate(bot, GatedInput("hi\n"))

    assert [t for *_, t in bubbles(output)] == ["答：hi"]


# --- against the real core (wired by bootstrap.build_simulation) ----------------------------------------

LONG_QUESTION = "请详细介绍一下退货流程"


def scripted_answer(query: str, history: Sequence[Turn]) -> str:
    if query == LONG_QUESTION:
        paragraph = "退货流程的第{0}步：请先在订单页面提交申请，客服审核通过后按照页面提示寄回商品。" * 6
        return "\n\n".join(paragraph.format(i) for i in range(1, 9))  # ~5.5 kB: fits 5 messages
    return f"您好！这里是售后助手，您说的是：{query}"


@pytest.mark.skipif(not hasattr(bootstrap, "build_simulation"), reason="wired by lead")
def test_simulation_through_the_real_core_and_dify_over_http() -> None:
    dify = FakeDifyServer(answer=scripted_answer, app_name="售后助手", chunk_size=64)
    assert len(scripted_answer(LONG_QUESTION, []).encode()) >= 5000
    with serve(dify.app) as url:
        settings = Settings(
            corp_id="wwsimulation0001",
            corp_secret="simulation-corp-secret",
            token="simulationtoken",
            encoding_aes_key="A" * 43,
            dify_api_base=f"{url}/v1",
            dify_api_key=dify.api_key,
        )
        parts = bootstrap.build_simulation(settings)  # type: ignore[attr-defined]
        fields = ("push_text", "sent_texts", "notify", "idle", "start", "stop", "app_label")
        callables = {name: getattr(parts, name) for name in fields}
        if dataclasses.is_dataclass(parts):
            assert set(fields) <= {f.name for f in dataclasses.fields(parts)}
        out = io.StringIO()

        code = run_simulate(
            **callables, stdin=io.StringIO(f"你好\n重置\n{LONG_QUESTION}\n/quit\n"), stdout=out
        )

        output = out.getvalue()
        sent = parts.sent_texts()

    assert code == 0, output
    found = bubbles(output)
    texts = [t for *_, t in found]
    # 你好 → Dify's answer
    assert texts[0] == "您好！这里是售后助手，您说的是：你好"
    # 重置 → the reset confirmation, without asking Dify
    assert texts[1] == ReplyTexts().reset_done
    asked = [r.json["query"] for r in dify.chat_requests()]
    assert asked == ["你好", LONG_QUESTION]
    # the long answer → several WeChat messages, each within WeCom's 2048 bytes
    long_bubbles = found[2:]
    assert len(long_bubbles) >= 3
    assert all(of in (len(long_bubbles), 0) for _, of, _, _ in long_bubbles)
    assert all(size <= 2048 for _, _, size, _ in long_bubbles)
    assert all(len(text.encode()) <= 2048 for text in sent)
    assert [len(t.encode()) for t in sent[2:]] == [size for _, _, size, _ in long_bubbles]
    joined = "".join(text for *_, text in long_bubbles)
    assert "第1步" in joined and "第8步" in joined
    assert ReplyTexts().truncated not in joined
    assert settings.corp_secret not in output
