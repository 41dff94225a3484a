"""`check` names a required input variable of the Dify app that kf-dify cannot fill (issue #17)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.dify_server import FakeDifyServer
from tests.support.http_server import serve
from tests.support.wecom_server import FakeWeComServer
from tests.unit.adapters.test_cli_check import CORP_ID, CORP_SECRET, DIFY_KEY, check, line, make_settings

REQUIRED_ORDER = {"text-input": {"variable": "order_no", "label": "订单号", "required": True}}
REQUIRED_NICKNAME = {"text-input": {"variable": "nickname", "label": "昵称", "required": True}}


@pytest.fixture(scope="module")
def urls() -> Iterator[tuple[FakeDifyServer, str, str]]:
    wecom = FakeWeComServer(corp_id=CORP_ID, corp_secret=CORP_SECRET)
    dify = FakeDifyServer(api_key=DIFY_KEY, mode="advanced-chat")
    with serve(wecom.app) as wecom_url, serve(dify.app) as dify_url:
        yield dify, wecom_url, dify_url


def test_a_required_variable_nobody_fills_fails_the_check(urls: tuple[FakeDifyServer, str, str]) -> None:
    dify, wecom_url, dify_url = urls
    dify.user_input_form = [REQUIRED_ORDER, REQUIRED_NICKNAME]

    code, text = check(make_settings(wecom_url, dify_url))

    assert code != 0
    failure = line(text, "FAIL dify")
    assert "order_no" in failure and "nickname" not in failure  # nickname: the service fills it
    assert "DIFY_INPUTS" in text


def test_dify_inputs_can_fill_it(urls: tuple[FakeDifyServer, str, str]) -> None:
    dify, wecom_url, dify_url = urls
    dify.user_input_form = [REQUIRED_ORDER]

    code, text = check(make_settings(wecom_url, dify_url, dify_inputs={"order_no": "-"}))

    assert code == 0, text
    assert "FAIL" not in text
