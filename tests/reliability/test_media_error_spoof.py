"""A customer's file cannot pose as a WeCom error.

media/get answers an error as JSON without Content-Disposition; a download always names its file. A customer
who sends a .txt or .json file whose bytes read `{"errcode":40014,...}` must get it handled as a file: no
access-token refresh, no forged log line (CR/LF in errmsg), no new counter label in /status. A real media/get
error with CR/LF in its errmsg is still understood, and its errmsg is logged on one line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator

import pytest

from adapters.outbound.wecom_paths import GETTOKEN, MEDIA_GET
from application.options import ReplyTexts
from application.telemetry import MAX_LABELS, OTHER, Telemetry
from tests.support.stack import KF, Servers, Stack, fake_servers, make_settings, running

pytestmark = pytest.mark.anyio
TEXTS = ReplyTexts()
SPOOF = b'{"errcode":40014,"errmsg":"x\\r\\nFAKE LOG"}'
DOCUMENTS = {
    "enabled": True,
    "allowed_file_types": ["document"],
    "allowed_file_upload_methods": ["local_file"],
    "number_limits": 3,
}


@pytest.fixture
def servers() -> Iterator[Servers]:
    with fake_servers(file_upload=DOCUMENTS) as s:
        yield s


@pytest.fixture
async def stack(servers: Servers) -> AsyncIterator[Stack]:
    async with running(make_settings(servers), servers) as s:
        yield s


def forged_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log lines that start with the injected text: what a log reader would take for a record of its own."""
    return [
        line
        for record in caplog.records
        for line in record.getMessage().splitlines()[1:]
        if line.startswith("FAKE LOG")
    ]


async def test_a_text_file_that_reads_like_an_errcode_is_a_file(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    assert json.loads(SPOOF)["errmsg"] == "x\r\nFAKE LOG"
    caplog.set_level(logging.DEBUG)
    stack.wecom.world.add_customer_media(KF, "wmSpoof", "file", SPOOF, "text/plain", filename="note.txt")

    assert (await stack.callback()).status_code == 200
    await stack.settle(30)

    assert [c.errcode for c in stack.wecom.calls_to(MEDIA_GET)] == [0]
    assert len(stack.wecom.calls_to(GETTOKEN)) == 1  # no refresh
    (upload,) = stack.dify.uploads.values()
    assert (upload.name, upload.data) == ("note.txt", SPOOF)
    (chat,) = stack.dify.chat_requests()
    assert chat.json["files"] == [
        {"type": "document", "transfer_method": "local_file", "upload_file_id": upload.id}
    ]
    assert stack.replies_to("wmSpoof") == [f"答：{TEXTS.file_query}"]
    assert forged_lines(caplog) == []
    status = (await stack.client.get("/status", headers=stack.admin_headers())).json()
    assert not status.get("wecom_errors")
    assert "40014" not in (await stack.client.get("/metrics")).text


async def test_a_json_file_that_reads_like_an_errcode_is_downloaded_as_a_file(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stack.wecom.world.add_customer_media(
        KF, "wmJson", "file", SPOOF, "application/json", filename="data.json"
    )

    assert (await stack.callback()).status_code == 200
    await stack.settle(30)

    assert [c.errcode for c in stack.wecom.calls_to(MEDIA_GET)] == [0]
    assert len(stack.wecom.calls_to(GETTOKEN)) == 1
    # The app takes documents, and .json is none: the customer hears which files it takes, not "failed".
    (reply,) = stack.replies_to("wmJson")
    assert reply not in (TEXTS.media_failed, TEXTS.media_expired)
    assert forged_lines(caplog) == []
    assert not stack.container.telemetry().labelled.get("wecom_errors")


async def test_a_real_media_error_with_cr_lf_in_errmsg_is_understood_and_logged_on_one_line(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stack.wecom.world.add_customer_media(
        KF, "wmGone", "file", b"%PDF-1.4 x", "application/pdf", filename="a.pdf"
    )
    stack.wecom.world.fail_next(MEDIA_GET, 40007, errmsg="invalid media_id\r\nFAKE LOG")

    assert (await stack.callback()).status_code == 200
    await stack.settle(30)

    assert stack.replies_to("wmGone") == [TEXTS.media_expired]
    assert forged_lines(caplog) == []
    assert any("FAKE LOG" in record.getMessage() for record in caplog.records)  # logged, escaped


def test_counter_labels_from_outside_are_bounded() -> None:
    telemetry = Telemetry()
    for errcode in range(100000, 101000):  # more than MAX_LABELS
        telemetry.count_labelled("wecom_errors", str(errcode))
    telemetry.count_labelled("wecom_errors", "x\r\nFAKE")
    telemetry.count_labelled("send_failures", "9" * 500)

    labels = telemetry.labelled["wecom_errors"]
    assert len(labels) == MAX_LABELS + 1
    assert labels[OTHER] == 1000 - MAX_LABELS + 1
    assert telemetry.labelled["send_failures"] == {OTHER: 1}
    # Known errcodes keep their own label however many strangers came first.
    telemetry.count_labelled("wecom_errors", "45009")
    assert labels["45009"] == 1
