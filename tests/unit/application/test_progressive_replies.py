"""Progressive replies over the fake-adapter container: a long answer's parts go out while the fake Dify is
still streaming it, never reasoning or a handoff marker, never with moderation on, within the quota."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from dependency_injector import providers

import bootstrap
from adapters.outbound.fake_dify import FakeChatEngine
from adapters.outbound.fake_wecom import KfWorld
from adapters.outbound.wechat_text import WeChatTextRenderer
from application.errors import ChatEngineError
from application.progressive import RENDER_GROWTH
from domain.chat import AppParameters
from domain.messages import CustomerRef
from domain.replies import TEXT_LIMIT_BYTES, split_reply
from tests.support.containers import fake_application, unit_settings

pytestmark = pytest.mark.anyio
KF = "wkProg"
TRUNCATED = "（回答较长，已截断）"


def paragraph(i: int, sentences: int = 12) -> str:
    return "".join(f"第{i}段第{j}句，这里说明一项具体的注意事项。" for j in range(sentences))


def long_answer(paragraphs: int = 8) -> str:
    return "\n\n".join(paragraph(i) for i in range(paragraphs))


async def until(condition: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.002)

    await asyncio.wait_for(poll(), 5)


class Stream:
    """Between the fake's chunks: lets the service run a while, and notes how many texts were out."""

    def __init__(self, world: KfWorld, customer: str) -> None:
        self.world = world
        self.customer = customer
        self.sent_at_chunk: list[int] = []

    def sent(self) -> int:
        return sum(1 for s in self.world.sent if s.customer.external_userid == self.customer)

    async def __call__(self, text_so_far: str) -> None:
        for _ in range(30):
            await asyncio.sleep(0)
        self.sent_at_chunk.append(self.sent())


def app_with(
    answer: str, *, customer: str, chunk: int = 200, streaming: bool = True, **parameters: Any
) -> tuple[bootstrap.Application, KfWorld, FakeChatEngine, Stream]:
    app = fake_application(unit_settings())
    app.adapters.renderer.override(providers.Object(WeChatTextRenderer()))
    engine = app.adapters.engine()
    engine.responder = lambda question, history: answer
    engine.streaming = streaming
    engine.stream_chunk_chars = chunk
    engine.app_parameters = AppParameters(**parameters)
    world = app.adapters.world()
    stream = Stream(world, customer)
    engine.between_chunks = stream
    return app, world, engine, stream


async def run(app: bootstrap.Application) -> None:
    app.dispatcher().notify(KF, "tok")
    await asyncio.wait_for(app.dispatcher().idle(), 20)


def texts(world: KfWorld, customer: str) -> list[str]:
    return [s.text for s in world.sent if s.customer.external_userid == customer]


def squeezed(text: str) -> str:
    return "".join(text.split())


async def test_a_long_answer_s_first_parts_go_out_while_dify_still_writes() -> None:
    answer = long_answer()
    app, world, _, stream = app_with(answer, customer="wmLong")
    world.add_customer_text(KF, "wmLong", "请详细说明")
    await run(app)

    sent = texts(world, "wmLong")
    assert stream.sent_at_chunk[-1] >= 1  # before the last chunk was streamed
    assert 2 <= len(sent) <= 5
    assert all(len(t.encode()) <= TEXT_LIMIT_BYTES for t in sent)
    assert squeezed("".join(sent)) == squeezed(answer)
    assert app.telemetry().counters["parts_sent_progressively"] >= 1


async def test_a_short_answer_goes_out_in_one_message() -> None:
    answer = "\n\n".join(paragraph(i, 3) for i in range(3))
    app, world, _, stream = app_with(answer, customer="wmShort", chunk=20)
    world.add_customer_text(KF, "wmShort", "简单问")
    await run(app)

    assert texts(world, "wmShort") == [answer]
    assert set(stream.sent_at_chunk) == {0}
    assert "parts_sent_progressively" not in app.telemetry().counters


class CountingRenderer(WeChatTextRenderer):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __call__(self, markdown: str) -> str:
        self.calls += 1
        return super().__call__(markdown)


async def test_an_answer_too_short_to_fill_a_part_is_rendered_once_at_the_end() -> None:
    """Nothing can go out early until the raw text could fill a part (RENDER_GROWTH): no rendering of each
    paragraph as it streams, one render of the whole answer."""
    answer = "您好！\n\n**要点**如下。\n\n1. 第一条\n2. 第二条\n\n如有问题，欢迎咨询。"
    assert len(answer.encode()) * RENDER_GROWTH <= TEXT_LIMIT_BYTES
    app, world, _, stream = app_with(answer, customer="wmTiny", chunk=4)
    renderer = CountingRenderer()
    app.adapters.renderer.override(providers.Object(renderer))
    world.add_customer_text(KF, "wmTiny", "简单问")
    await run(app)

    assert len(stream.sent_at_chunk) >= 8  # streamed in many chunks, across several paragraph boundaries
    assert renderer.calls == 1
    assert texts(world, "wmTiny") == [WeChatTextRenderer()(answer)]


@pytest.mark.parametrize("setting", ["moderation", "blocking"])
async def test_with_output_moderation_or_in_blocking_mode_the_answer_goes_out_whole(setting: str) -> None:
    answer = long_answer()
    if setting == "moderation":
        app, world, _, stream = app_with(answer, customer="wmWhole", moderation_enabled=True)
    else:
        app, world, _, stream = app_with(answer, customer="wmWhole", streaming=False)
    world.add_customer_text(KF, "wmWhole", "请详细说明")
    await run(app)

    assert not any(stream.sent_at_chunk)
    assert texts(world, "wmWhole") == split_reply(answer)
    assert "parts_sent_progressively" not in app.telemetry().counters


async def test_a_handoff_marker_split_across_chunks_is_never_shown_and_the_handoff_happens() -> None:
    answer = long_answer(6) + "\n\n这个问题我帮您转给人工客服。[[转人工]]\n\n请稍候。"
    app, world, _, _ = app_with(answer, customer="wmMark", chunk=7)
    world.add_customer_text(KF, "wmMark", "我要退款")
    await run(app)

    sent = texts(world, "wmMark")
    assert app.telemetry().counters["parts_sent_progressively"] >= 1
    assert not any("[" in t or "转人工]" in t for t in sent)
    assert squeezed("".join(sent)).startswith(squeezed(long_answer(6)))
    assert world.get_state(CustomerRef(KF, "wmMark")).state == 2  # in the queue


async def test_reasoning_split_across_chunks_is_never_shown() -> None:
    reasoning = "\n\n".join(f"推理步骤{i}：先分析用户的意图，再查找资料。" * 10 for i in range(6))
    answer = long_answer()
    streamed = f"<think>\n{reasoning}\n</think>\n\n{answer}"
    app, world, _, stream = app_with(streamed, customer="wmThink", chunk=5)
    world.add_customer_text(KF, "wmThink", "说说看")
    await run(app)

    sent = texts(world, "wmThink")
    assert not any("推理" in t or "think" in t for t in sent)
    assert squeezed("".join(sent)) == squeezed(answer)
    assert app.telemetry().counters["parts_sent_progressively"] >= 1
    assert stream.sent_at_chunk[-1] >= 1


async def test_a_very_long_answer_stays_within_the_quota_and_says_it_was_cut() -> None:
    answer = long_answer(40)
    app, world, _, _ = app_with(answer, customer="wmHuge", chunk=400)
    world.add_customer_text(KF, "wmHuge", "全部告诉我")
    await run(app)

    sent = texts(world, "wmHuge")
    assert len(sent) == 5
    assert sent[-1].endswith(TRUNCATED)
    # Two messages stay free while parts go out early: the rest, and a file, notice or failure text.
    assert app.telemetry().counters["parts_sent_progressively"] <= 3
    assert squeezed(answer).startswith(squeezed("".join(sent)).removesuffix(squeezed(TRUNCATED)))


async def test_a_failure_after_parts_went_out_is_not_retried_and_is_reported_politely() -> None:
    answer = long_answer()
    app, world, engine, stream = app_with(answer, customer="wmBroken")

    async def break_off(text_so_far: str) -> None:
        await stream(text_so_far)
        if len(text_so_far) > len(answer) * 2 // 3:
            await until(lambda: stream.sent() >= 1)
            raise ChatEngineError("completion_request_error", "model overloaded", retryable=True)

    engine.between_chunks = break_off
    world.add_customer_text(KF, "wmBroken", "请详细说明")
    await run(app)

    sent = texts(world, "wmBroken")
    assert len(engine.questions) == 1  # not asked again: the customer is reading this answer already
    assert len(sent) >= 2
    assert sent[-1] == app.options().texts.fallback
    assert squeezed(answer).startswith(squeezed("".join(sent[:-1])))


async def test_a_retry_before_anything_went_out_starts_over_cleanly() -> None:
    answer = long_answer()
    app, world, engine, _ = app_with(answer, customer="wmRetry")
    engine.fail_next(ChatEngineError("completion_request_error", "busy", retryable=True))
    app.options.override(providers.Object(dataclasses.replace(app.options(), dify_retry_delay_s=0.0)))
    world.add_customer_text(KF, "wmRetry", "请详细说明")
    await run(app)

    assert len(engine.questions) == 2
    assert squeezed("".join(texts(world, "wmRetry"))) == squeezed(answer)


async def test_a_part_goes_out_once_the_paragraph_being_written_shows_more_than_a_part_follows() -> None:
    paragraphs = [paragraph(i, 15) for i in range(6)]  # about 950 bytes each: two fill most of a message
    answer = "\n\n".join(paragraphs)
    app, world, engine, stream = app_with(answer, customer="wmEarly", chunk=20)
    halfway_third = len(paragraphs[0]) + len(paragraphs[1]) + 4 + len(paragraphs[2]) // 2
    first_part_while_third_is_written: list[bool] = []

    async def watch(text_so_far: str) -> None:
        await stream(text_so_far)
        if len(text_so_far) >= halfway_third and not first_part_while_third_is_written:
            await until(lambda: stream.sent() >= 1)
            first_part_while_third_is_written.append(paragraphs[2] not in text_so_far)

    engine.between_chunks = watch
    world.add_customer_text(KF, "wmEarly", "请详细说明")
    await run(app)

    sent = texts(world, "wmEarly")
    assert first_part_while_third_is_written == [True]
    assert sent[0] == f"{paragraphs[0]}\n\n{paragraphs[1]}"
    assert squeezed("".join(sent)) == squeezed(answer)


async def test_an_answer_replaced_after_parts_went_out_is_sent_whole_after_them() -> None:
    # The app said moderation was off, yet the answer was replaced (message_replace) after parts went out:
    # the customer still gets the final answer, whole, after what they already read.
    answer = long_answer()
    app, world, engine, _ = app_with(answer, customer="wmReplaced")
    engine.replace_next("抱歉，这个问题我无法回答。")
    world.add_customer_text(KF, "wmReplaced", "请详细说明")
    await run(app)

    sent = texts(world, "wmReplaced")
    assert app.telemetry().counters["parts_sent_progressively"] >= 1
    assert sent[-1] == "抱歉，这个问题我无法回答。"
    assert len(sent) <= 5
