"""Model output that made the renderer quadratic must not freeze the service (issue #13, point 3).

A 32 KB answer of unclosed `<div ` tags stalled every other request (/healthz included) for 12 s, and
repeated `<think` or nested handoff markers did the same at 64-256 KB: rendering runs on the event loop.
Now what is rendered is capped to what can be sent, every scan is linear, and markup markdown-it would be
slow on gets a plain-text cleanup instead.

Nothing here asserts on wall-clock time, which a loaded machine stretches at will:
- "finishes" is pytest-timeout's guard, and the work is an operation count: the Python calls a render makes
  (sys.setprofile, deterministic) do not grow with the answer past the cap;
- "the loop stays responsive" is measured in CPU time of the event loop's thread between two ticks of a
  monitor task: other processes on the machine cannot add to it, only work done on the loop can.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import pytest

from adapters.outbound.wechat_text import MAX_RENDERED_CHARS, WeChatTextRenderer
from domain.handoff import DEFAULT_HANDOFF_MARKERS, take_handoff_marker
from tests.support.stack import KF, Servers, Stack, fake_servers, make_settings, running

KB = 1024
render = WeChatTextRenderer()


def _repeat(unit: str, size: int) -> str:
    return unit * (size // len(unit))


def _nested_markers(size: int) -> str:
    depth = size // 10
    return "好的，马上为您转接。" + "[[转人" * depth + "[[转人工]]" + "工]]" * depth


FAMILIES: dict[str, Callable[[int], str]] = {
    "unclosed-div": lambda n: _repeat("<div ", n),
    "unclosed-think": lambda n: _repeat("<think", n),
    "think-blocks": lambda n: _repeat("<think>x</think>答", n),
    "unclosed-details": lambda n: _repeat("<details>", n),
    "nested-handoff-markers": _nested_markers,
    "unterminated-handoff-markers": lambda n: _repeat("[[转人", n),
    "deep-list": lambda n: "".join("  " * i + "- a\n" for i in range(n // 64)) + _repeat("- ", n // 2),
    "deep-blockquote": lambda n: _repeat("> ", n),
    "emphasis-run": lambda n: _repeat("*a", n),
    "underscore-run": lambda n: _repeat("_a", n),
    "backticks": lambda n: _repeat("`", n),
    "backtick-runs": lambda n: _repeat("`a``", n),
    "link-openers": lambda n: _repeat("[a](", n),
    "image-openers": lambda n: _repeat("![a](", n),
    "brackets": lambda n: _repeat("[", n),
    "softbreak-lines": lambda n: _repeat("a\n", n),
    "table-rows": lambda n: "|a|b|\n|-|-|\n" + _repeat("|a|b|\n", n),
}


def _answer(answer: str) -> str:
    """What the application does with an answer's text: markers out, then rendering."""
    marked = take_handoff_marker(answer, DEFAULT_HANDOFF_MARKERS)
    return render(marked.text) if marked.text.strip() else ""


def _python_calls(work: Callable[[], object]) -> int:
    calls = 0

    def count(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        work()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.timeout(60)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_256_kb_pathological_answer_renders_to_a_bounded_text(family: str) -> None:
    text = _answer(FAMILIES[family](256 * KB))

    assert len(text) <= MAX_RENDERED_CHARS
    assert not re.search(r"</?think[^<>]*>", text, re.IGNORECASE)
    assert "[[转人工]]" not in text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_work_grows_at_most_linearly_with_the_answer(family: str) -> None:
    make = FAMILIES[family]
    make(1 * KB)  # warm caches (compiled patterns, markdown-it rules) before counting

    small = _python_calls(lambda: _answer(make(32 * KB)))
    large = _python_calls(lambda: _answer(make(256 * KB)))

    # 8x the answer: linear work is at most 8x (capped work stays where it was), quadratic would be 64x.
    assert large <= 10 * small + 1000, (small, large)


# --- through the running service ----------------------------------------------------------------------

# 100 ms of CPU on the loop's thread between two ticks of the monitor is a stall every other request feels.
STALL_CPU_S = 0.1


@dataclass
class LoopMonitor:
    """Ticks every few ms; notes how much CPU the event loop's thread used between two ticks."""

    stalls: list[float] = field(default_factory=list)
    ticks: int = 0
    worst: float = 0.0

    async def run(self) -> None:
        last = time.thread_time()
        while True:
            await asyncio.sleep(0.002)
            now = time.thread_time()
            self.ticks += 1
            used, last = now - last, now
            self.worst = max(self.worst, used)
            if used > STALL_CPU_S:
                self.stalls.append(used)


PATHOLOGICAL_QUERIES = {
    "div": FAMILIES["unclosed-div"](32 * KB),
    "think": FAMILIES["unclosed-think"](64 * KB),
    "markers": FAMILIES["nested-handoff-markers"](64 * KB),
    "emphasis": FAMILIES["emphasis-run"](64 * KB),
}


def _answer_for(query: str, history: Sequence[Any]) -> str:
    return PATHOLOGICAL_QUERIES.get(query, f"答：{query}")


@pytest.fixture
def servers() -> Iterator[Servers]:
    # Big chunks: the answer arrives in a few events, so what is measured is what the service does with it.
    with fake_servers(answer=_answer_for, chunk_size=16 * KB) as s:
        yield s


@pytest.fixture
async def stack(servers: Servers) -> AsyncIterator[Stack]:
    async with running(make_settings(servers, interim_after_s=0.0), servers) as s:
        yield s


@pytest.mark.anyio
@pytest.mark.timeout(120)
@pytest.mark.parametrize("query", PATHOLOGICAL_QUERIES)
async def test_healthz_keeps_answering_while_a_pathological_answer_is_handled(
    stack: Stack, query: str
) -> None:
    customer = f"wmPatho{query}"
    stack.wecom.world.add_customer_text(KF, customer, query)
    monitor = LoopMonitor()
    answered = 0
    in_progress = True

    async def healthz() -> None:
        nonlocal answered
        while in_progress:
            response = await stack.client.get("/healthz")
            assert response.status_code == 200
            answered += 1
            # Over ASGITransport a request may never suspend: pace the probe, or it would hog the loop itself.
            await asyncio.sleep(0.005)

    # A healthz answered first: the service is up, and the monitor has a baseline.
    assert (await stack.client.get("/healthz")).status_code == 200
    watcher = asyncio.create_task(monitor.run())
    prober = asyncio.create_task(healthz())
    try:
        assert (await stack.callback()).status_code == 200
        await stack.settle(60)
        in_progress = False
        await prober
    finally:
        in_progress = False
        watcher.cancel()
        prober.cancel()

    assert monitor.stalls == [], f"event loop held for {monitor.stalls} s of CPU"
    assert monitor.ticks > 0 and answered > 0
    replies = stack.replies_to(customer)
    assert replies, "the customer got no answer"
    assert sum(len(r.encode()) for r in replies) <= 5 * 2048
