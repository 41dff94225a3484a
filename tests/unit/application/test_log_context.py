"""Every line logged while a message is handled names it (kf account, customer, msgid): set once by the
drain, not repeated at the call sites."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from adapters.inbound.log_setup import RedactSecrets, TextFormatter
from adapters.outbound.fake_wecom import KfWorld
from tests.support.containers import fake_application, unit_settings

pytestmark = pytest.mark.anyio
KF = "wkContext"


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.addFilter(RedactSecrets([]))
        self.setFormatter(TextFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("kfdify")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


async def test_the_answer_path_logs_the_message_it_handles(lines: Lines) -> None:
    app = fake_application(unit_settings(texts={"fallback": "系统繁忙"}))
    world: KfWorld = app.adapters.world()
    first = world.add_customer_text(KF, "wmOne", "hello")
    second = world.add_customer_text(KF, "wmTwo", "重置")

    app.dispatcher().notify(KF, "tok")
    await asyncio.wait_for(app.dispatcher().idle(), 10)

    def named(what: str) -> list[str]:
        return [line for line in lines.lines if what in line]

    (asking,) = named("asking dify")
    assert f"kf={KF} customer=wmOne msgid={first}]" in asking
    (answered,) = named("dify answered")
    assert f"kf={KF} customer=wmOne msgid={first}]" in answered
    sent = named("reply sent")
    assert len(sent) == 2
    assert any(f"customer=wmOne msgid={first}]" in line for line in sent)
    assert any(f"customer=wmTwo msgid={second}]" in line for line in sent)
    (reset,) = named("conversation reset")
    assert f"kf={KF} customer=wmTwo msgid={second}]" in reset
    # Lines outside a message's handling (the pull) carry no message context.
    pulled = named("pulled")
    assert pulled and all("customer=" not in line for line in pulled)
