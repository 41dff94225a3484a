"""`simulate` with a merge window: lines sent in a burst are asked as one question, as in WeChat."""

from __future__ import annotations

import io

import bootstrap
from adapters.inbound.cli_simulate import run_parts
from tests.support.dify_server import FakeDifyServer
from tests.support.http_server import serve
from tests.support.simulation import simulation_settings


def test_a_burst_of_lines_is_one_question_with_one_answer() -> None:
    dify = FakeDifyServer(app_name="售后助手")
    with serve(dify.app) as url:
        settings = simulation_settings(url, dify.api_key, merge_window_s=3.0)
        parts = bootstrap.build_simulation(settings)
        out = io.StringIO()

        code = run_parts(
            parts,
            stdin=io.StringIO("你好\n我想退货\n订单号 12345\n/quit\n"),
            stdout=out,
            merge_window_s=settings.merge_window_s,
        )

    assert code == 0
    assert [r.json["query"] for r in dify.chat_requests()] == ["你好\n我想退货\n订单号 12345"]
    assert parts.sent_texts() == ["答：你好\n我想退货\n订单号 12345"]
    output = out.getvalue()
    assert "[2 条消息并入前一条一起提问 / 2 line(s) asked with the one before]" in output
    assert "[bot 1/1 · " in output and "答：你好\n我想退货\n订单号 12345\n" in output
