"""[BOT] MERGE_WINDOW: off unless set, checked at start, and handed to the drain through BotOptions."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.inbound.config_file import ConfigError, load_settings
from adapters.inbound.settings import build_options
from tests.support.service_process import write_config

MAIN = {
    "CORP_ID": "ww1436e0e65a779aee",
    "CORP_SECRET": "secret",
    "TOKEN": "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo",
    "ENCODING_AES_KEY": "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt",
    "DIFY_API_BASE": "https://dify.example.com/v1",
    "DIFY_API_KEY": "app-default",
}


def _config(tmp_path: Path, bot: dict[str, str]) -> str:
    return str(write_config(tmp_path / "config.ini", {"CONFIG": MAIN, "BOT": bot}))


def test_unset_means_every_message_on_its_own(tmp_path: Path) -> None:
    settings = load_settings(_config(tmp_path, {}), {})
    assert settings.merge_window_s == 0.0
    assert build_options(settings).merge_window_s == 0.0


def test_the_window_reaches_the_options(tmp_path: Path) -> None:
    settings = load_settings(_config(tmp_path, {"MERGE_WINDOW": "2.5"}), {})
    assert build_options(settings).merge_window_s == 2.5


def test_the_environment_sets_it_too(tmp_path: Path) -> None:
    assert load_settings(_config(tmp_path, {}), {"BOT_MERGE_WINDOW": "3"}).merge_window_s == 3.0


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_a_bad_window_is_refused_at_start(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(_config(tmp_path, {"MERGE_WINDOW": value}), {})
    assert any("MERGE_WINDOW" in problem for problem in caught.value.problems)
