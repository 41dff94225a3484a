"""[TEXTS] msg_<msgtype> and needs_human_input: read, switched off by an empty value, checked at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.inbound.config_file import ConfigError, load_settings
from adapters.inbound.settings import build_texts
from application.options import ReplyTexts
from domain.message_text import DEFAULT_MESSAGE_TEMPLATES
from tests.support.service_process import write_config

MAIN = {
    "CORP_ID": "ww1436e0e65a779aee",
    "CORP_SECRET": "secret",
    "TOKEN": "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo",
    "ENCODING_AES_KEY": "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt",
    "DIFY_API_BASE": "https://dify.example.com/v1",
    "DIFY_API_KEY": "app-default",
}


def _config(tmp_path: Path, sections: dict[str, dict[str, str]]) -> str:
    return str(write_config(tmp_path / "config.ini", {"CONFIG": MAIN, **sections}))


def test_the_defaults_are_the_domain_templates() -> None:
    texts = ReplyTexts()
    assert texts.message_templates == dict(DEFAULT_MESSAGE_TEMPLATES)
    assert texts.needs_human_input


def test_a_template_and_the_paused_text_are_read(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        {"TEXTS": {"msg_link": "链接：{title}\\n{url}", "needs_human_input": "稍等，人工确认中。"}},
    )
    texts = build_texts(load_settings(path, {}).texts)
    assert texts.msg_link == "链接：{title}\n{url}"
    assert texts.needs_human_input == "稍等，人工确认中。"
    assert texts.msg_location == DEFAULT_MESSAGE_TEMPLATES["msg_location"]


def test_an_empty_template_switches_the_msgtype_off(tmp_path: Path) -> None:
    path = _config(tmp_path, {"TEXTS": {"msg_channels_shop_order": "", "fallback": ""}})
    texts = build_texts(load_settings(path, {}).texts)
    assert texts.msg_channels_shop_order == ""
    # Other texts keep "empty = unset".
    assert texts.fallback == ReplyTexts().fallback


def test_an_empty_environment_variable_switches_it_off_too(tmp_path: Path) -> None:
    settings = load_settings(_config(tmp_path, {}), {"KFDIFY_TEXTS_MSG_LINK": ""})
    assert build_texts(settings.texts).msg_link == ""


def test_an_empty_template_in_a_kf_section_switches_it_off_for_that_account(tmp_path: Path) -> None:
    path = _config(tmp_path, {"KF:wkAAA": {"msg_location": ""}})
    settings = load_settings(path, {})
    (route,) = settings.kf_routes
    assert build_texts(route.texts, build_texts(settings.texts)).msg_location == ""
    assert build_texts(settings.texts).msg_location == DEFAULT_MESSAGE_TEMPLATES["msg_location"]


@pytest.mark.parametrize(
    ("section", "template", "why"),
    [
        ("TEXTS", "商品：{title.x}", "msg_channels_shop_product"),
        ("TEXTS", "商品：{title", "msg_channels_shop_product"),
        ("TEXTS", "商品：{colour}", "colour"),
        ("KF:wkAAA", "商品：{price:.2f}", r"\[KF:wkAAA\] msg_channels_shop_product"),
    ],
)
def test_a_bad_template_is_refused_at_start(tmp_path: Path, section: str, template: str, why: str) -> None:
    path = _config(tmp_path, {section: {"msg_channels_shop_product": template}})
    with pytest.raises(ConfigError, match=why):
        load_settings(path, {})
