"""`[BOT] SUGGESTIONS` and `[TEXTS] suggestions_head` in config.ini, and what bootstrap makes of them."""

from __future__ import annotations

from pathlib import Path

import pytest

import bootstrap
from adapters.inbound.config_file import ConfigError, load_settings
from tests.unit.adapters.test_config_customer_service import config


def test_suggestions_follow_the_app_by_default(tmp_path: Path) -> None:
    settings = load_settings(config(tmp_path), {})
    options = bootstrap.build_options(settings)
    assert settings.suggestions is True and options.suggestions is True
    assert options.texts.suggestions_head == "您可能还想问："


@pytest.mark.parametrize(("value", "expected"), [("off", False), ("OFF", False), ("on", True), ("no", False)])
def test_suggestions_can_be_turned_off(tmp_path: Path, value: str, expected: bool) -> None:
    settings = load_settings(config(tmp_path, BOT={"SUGGESTIONS": value}), {})
    assert bootstrap.build_options(settings).suggestions is expected


def test_a_wrong_value_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(config(tmp_path, BOT={"SUGGESTIONS": "sometimes"}), {})
    assert any("SUGGESTIONS" in p and "on or off" in p for p in caught.value.problems)


def test_the_menu_head_is_configurable(tmp_path: Path) -> None:
    settings = load_settings(config(tmp_path, TEXTS={"suggestions_head": "猜您想问："}), {})
    assert bootstrap.build_options(settings).texts.suggestions_head == "猜您想问："
