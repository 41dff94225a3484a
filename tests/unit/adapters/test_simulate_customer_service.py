"""`bootstrap.py simulate` also shows what goes through send_msg_on_event (the handoff notice)."""

from __future__ import annotations

import io
import re

import bootstrap
from adapters.inbound.cli_simulate import run_parts
from application.options import ReplyTexts
from tests.support.dify_server import FakeDifyServer
from tests.support.http_server import serve
from tests.support.simulation import simulation_settings


def test_the_handoff_notice_shows_in_the_simulation_after_the_answer() -> None:
    dify = FakeDifyServer(answer=lambda q, h: f"答：{q}" if q != "投诉" else "马上为您转接。[[转人工]]")
    with serve(dify.app) as url:
        settings = simulation_settings(url, dify.api_key, interim_after_s=0.0)
        parts = bootstrap.build_simulation(settings)
        out = io.StringIO()
        code = run_parts(
            parts,
            stdin=io.StringIO("你好\n投诉\n/quit\n"),
            stdout=out,
        )
    assert code == 0
    assert parts.sent_texts() == ["答：你好", "马上为您转接。", ReplyTexts().handoff]
    assert "[[转人工]]" not in out.getvalue()
    assert re.search(re.escape(ReplyTexts().handoff), out.getvalue())
