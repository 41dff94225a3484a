"""`simulate` with a merge window: lines sent in a burst are asked as one question, as in WeChat."""

from __future__ import annotations

import io

import bootstrap
from adapters.inbound.cli_simulate import run_simulate
from adapters.inbound.config_file import Settings
from tests.support.dify_server import FakeDifyServer
from tests.support.http_server import serve


def test_a_burst_of_lines_is_one_question_with_one_answer() -> None:
    dify = FakeDifyServer(app_name="售后助手")
    with serve(dify.app) as url:
        settings = Settings(
            corp_id="wwsimulation0001",
            corp_secret="simulation-corp-secret",
            token="simulationtoken",
            encoding_aes_key="A" * 43,
            dify_api_base=f"{url}/v1",
            dify_api_key=dify.api_key,
            merge_window_s=3.0,
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
            stdin=io.StringIO("你好\n我想退货\n订单号 12345\n/quit\n"),
            stdout=out,
            merge_window_s=settings.merge_window_s,
            merged_count=parts.merged_count,
        )

    assert code == 0
    assert [r.json["query"] for r in dify.chat_requests()] == ["你好\n我想退货\n订单号 12345"]
    assert parts.sent_texts() == ["答：你好\n我想退货\n订单号 12345"]
    output = out.getvalue()
    assert "[2 条消息并入前一条一起提问 / 2 line(s) asked with the one before]" in output
    assert "[bot 1/1 · " in output and "答：你好\n我想退货\n订单号 12345\n" in output
