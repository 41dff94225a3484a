"""Log lines: the handled message's context on every line, and no line forged by text from outside."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest

from adapters.inbound.log_setup import JsonFormatter, RedactSecrets, TextFormatter, escape_controls
from application.log_context import handling
from application.telemetry import correlation_id
from domain.messages import InboundMessage, Origin

FORGED = "ok\n2026-01-01 00:00:00,000 ERROR   kfdify.answer [-] forged\r\x85\u2028\u2029\x1b[31m\x00end"


def message(*, external_userid: str = "wmCustomer", msgid: str = "msg-1") -> InboundMessage:
    return InboundMessage(
        msgid=msgid,
        open_kfid="wkAccount",
        external_userid=external_userid,
        send_time=1_700_000_000,
        origin=Origin.CUSTOMER,
        msgtype="text",
        text="hello",
    )


class Capture(logging.Handler):
    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.addFilter(RedactSecrets(["secret-value"]))
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(params=["text", "json"])
def capture(request: pytest.FixtureRequest) -> Iterator[Capture]:
    handler = Capture(TextFormatter() if request.param == "text" else JsonFormatter())
    logger = logging.getLogger("kfdify.test_log_setup")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield handler
    logger.removeHandler(handler)
    logger.propagate = True


def log() -> logging.Logger:
    return logging.getLogger("kfdify.test_log_setup")


def test_escape_controls_leaves_one_line() -> None:
    escaped = escape_controls(FORGED)
    assert escaped.splitlines() == [escaped]
    assert "\\n2026" in escaped and "\\r" in escaped and "\\x85" in escaped and "\\u2028" in escaped
    assert "\\x1b[31m" in escaped and "\\x00end" in escaped
    assert escape_controls("普通的中文 text = 1") == "普通的中文 text = 1"


def test_text_lines_carry_the_message_context_set_once() -> None:
    handler = Capture(TextFormatter())
    logger = log()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("outside")
        with handling(message()):
            logger.info("reply sent part=%d", 0)
        logger.info("after")
    finally:
        logger.removeHandler(handler)
    outside, inside, after = handler.lines
    assert "[- kf=wkAccount customer=wmCustomer msgid=msg-1] reply sent part=0" in inside
    assert outside.endswith("[-] outside") and after.endswith("[-] after")


@pytest.mark.anyio
async def test_tasks_started_while_handling_keep_the_context(capture: Capture) -> None:
    async def step() -> None:
        log().info("asking dify")

    token = correlation_id.set("cb-1")
    try:
        with handling(message(msgid="msg-task")):
            await asyncio.create_task(step())
    finally:
        correlation_id.reset(token)
    (line,) = capture.lines
    if line.startswith("{"):
        record = json.loads(line)
        assert (record["request_id"], record["kf"], record["customer"], record["msgid"]) == (
            "cb-1",
            "wkAccount",
            "wmCustomer",
            "msg-task",
        )
        assert record["message"] == "asking dify"
    else:
        assert "[cb-1 kf=wkAccount customer=wmCustomer msgid=msg-task] asking dify" in line


def test_text_from_outside_cannot_forge_a_line(capture: Capture) -> None:
    with handling(message(external_userid="wm\nforged", msgid="m\u2028x")):
        log().warning("dify failed: %s", FORGED)
    (line,) = capture.lines
    assert line.splitlines() == [line]
    assert "\u2028" not in line and "\x85" not in line and "\x1b" not in line
    if line.startswith("{"):
        record = json.loads(line)  # the JSON keeps the original text, escaped on the line
        assert record["message"] == f"dify failed: {FORGED}"
        assert record["customer"] == "wm\nforged" and record["msgid"] == "m\u2028x"
    else:
        assert "customer=wm\\nforged msgid=m\\u2028x]" in line


def test_a_traceback_cannot_forge_a_line_either(capture: Capture) -> None:
    try:
        raise ValueError(f"bad input {FORGED}")
    except ValueError:
        log().exception("failed secret-value")
    (entry,) = capture.lines
    if entry.startswith("{"):
        assert entry.splitlines() == [entry]
        record = json.loads(entry)
        assert record["message"] == "failed ***" and "ValueError: bad input" in record["exception"]
        return
    first, *trace = entry.splitlines()
    assert first.endswith("failed ***")
    assert trace and all(line.startswith("\t") for line in trace)
    # The exception's own line break stays in the traceback, but indented: it starts no line of its own.
    assert "\tValueError: bad input ok" in trace
    assert any(line.startswith("\t2026-01-01") for line in trace)
    assert "\x1b" not in entry and "\x00" not in entry
