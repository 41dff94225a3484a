"""`bootstrap.py simulate` also shows what goes through send_msg_on_event (the handoff notice)."""

from __future__ import annotations

import io
import re

import bootstrap
from adapters.inbound.cli_simulate import run_simulate
from adapters.inbound.config_file import Settings
from application.options import ReplyTexts
from tests.support.dify_server import FakeDifyServer
from tests.support.http_server import serve


def test_the_handoff_notice_shows_in_the_simulation_after_the_answer() -> None:
    dify = FakeDifyServer(answer=lambda q, h: f"答：{q}" if q != "投诉" else "马上为您转接。[[转人工]]")
    with serve(dify.app) as url:
        settings = Settings(
            corp_id="wwsimulation0001",
            corp_secret="simulation-corp-secret",
            token="simulationtoken",
            encoding_aes_key="A" * 43,
            dify_api_base=f"{url}/v1",
            dify_api_key=dify.api_key,
            interim_after_s=0.0,
        )
        parts = bootstrap.build_simulation(settings)
        out = io.StringIO()
        code = run_simulate(
            push_text=parts.push_text,
            sent_texts=parts.sent_texts,
            notify=parts.notify,
            idle=parts.idle,
            start=parts.start,
            stop=parts.stop,
            app_label=parts.app_label,
            stdin=io.StringIO("你好\n投诉\n/quit\n"),
            stdout=out,
        )
    assert code == 0
    assert parts.sent_texts() == ["答：你好", "马上为您转接。", ReplyTexts().handoff]
    assert "[[转人工]]" not in out.getvalue()
    assert re.search(re.escape(ReplyTexts().handoff), out.getvalue())
