"""The customer-service keys in config.ini and the environment, and how bootstrap turns them into routes."""

from __future__ import annotations

from pathlib import Path

import pytest

import bootstrap
from adapters.inbound.config_file import ConfigError, load_settings
from adapters.outbound.fake_dify import FakeChatEngine
from application.options import BotOptions
from domain.handoff import DEFAULT_HANDOFF_MARKERS
from tests.support.service_process import write_config

MAIN = {
    "CORP_ID": "ww1436e0e65a779aee",
    "CORP_SECRET": "secret",
    "TOKEN": "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo",
    "ENCODING_AES_KEY": "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt",
    "DIFY_API_BASE": "https://dify.example.com/v1",
    "DIFY_API_KEY": "app-default",
}


def config(tmp_path: Path, **sections: dict[str, str]) -> str:
    return str(write_config(tmp_path / "config.ini", {"CONFIG": MAIN, **sections}))


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings(config(tmp_path), {})
    assert settings.interim_after_s == 5.0
    assert (settings.rate_limit, settings.rate_limit_window_s) == (20, 60.0)
    assert settings.session_state_ttl_s == 60.0
    assert settings.servicer_userid == "" and settings.handoff_markers == ()
    options = bootstrap.build_options(settings)
    assert options.interim_after_s == 5.0
    assert options.handoff_markers == DEFAULT_HANDOFF_MARKERS
    assert options.handoff_words == BotOptions().handoff_words == ("转人工", "人工客服", "人工")


def test_bot_keys_from_the_file(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        BOT={
            "INTERIM_AFTER": "0",
            "RATE_LIMIT": "5",
            "RATE_LIMIT_WINDOW": "30",
            "SESSION_STATE_TTL": "10",
            "SERVICER_USERID": "zhangsan",
            "HANDOFF_WORDS": "人工,客服",
            "HANDOFF_MARKERS": "<<HUMAN>>,[HANDOFF]",
        },
        TEXTS={"welcome": "欢迎！", "handoff": "稍等", "rate_limited": "慢一点"},
    )
    options = bootstrap.build_options(load_settings(path, {}))
    assert options.interim_after_s == 0.0
    assert (options.rate_limit, options.rate_limit_window_s, options.session_state_ttl_s) == (5, 30.0, 10.0)
    assert options.handoff_words == ("人工", "客服")
    assert options.handoff_markers == ("<<HUMAN>>", "[HANDOFF]")
    assert (options.texts.welcome, options.texts.handoff, options.texts.rate_limited) == (
        "欢迎！",
        "稍等",
        "慢一点",
    )


def test_environment_overrides_follow_the_naming_rule(tmp_path: Path) -> None:
    env = {
        "BOT_RATE_LIMIT": "0",
        "KFDIFY_BOT_INTERIM_AFTER": "2.5",
        "BOT_SERVICER_USERID": "lisi",
        "TEXTS_WELCOME": "环境变量的欢迎",
    }
    settings = load_settings(config(tmp_path), env)
    assert settings.rate_limit == 0 and settings.interim_after_s == 2.5
    assert settings.servicer_userid == "lisi" and settings.texts["welcome"] == "环境变量的欢迎"


def test_bad_values_are_reported(tmp_path: Path) -> None:
    path = config(tmp_path, BOT={"RATE_LIMIT": "many", "INTERIM_AFTER": "-1"})
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    problems = "\n".join(caught.value.problems)
    assert "RATE_LIMIT" in problems and "INTERIM_AFTER" in problems


def test_kf_sections_carry_their_app_welcome_servicer_and_texts(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        BOT={"SERVICER_USERID": "zhangsan"},
        TEXTS={"fallback": "默认兜底"},
        **{
            "KF:wkSales": {
                "DIFY_API_BASE": "https://dify.example.com/v1",
                "DIFY_API_KEY": "app-sales",
                "WELCOME": "欢迎来到销售咨询",
                "SERVICER_USERID": "sales_lead",
                "handoff": "正在为您转接销售",
                "fallback": "销售助手暂时忙",
            },
            "KF:wkSupport": {"welcome": "售后服务为您服务"},
        },
    )
    settings = load_settings(path, {})
    routing = bootstrap.build_routing(settings, FakeChatEngine(), bootstrap.build_options(settings))
    sales, support, other = routing.for_kf("wkSales"), routing.for_kf("wkSupport"), routing.for_kf("wkOther")
    assert sales.servicer_userid == "sales_lead"
    assert support.servicer_userid == "zhangsan" == other.servicer_userid
    assert sales.texts.welcome == "欢迎来到销售咨询" and support.texts.welcome == "售后服务为您服务"
    assert other.texts.welcome == ""
    assert (sales.texts.handoff, sales.texts.fallback) == ("正在为您转接销售", "销售助手暂时忙")
    assert support.texts.fallback == "默认兜底" == other.texts.fallback
    # Its own Dify app for the sales account; the support account shares the default app.
    assert sales.engine is not other.engine and support.engine is other.engine
    assert other is routing.default
