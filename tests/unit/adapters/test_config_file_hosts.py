"""[BOT] FILE_HOSTS: parsed and checked at start, and handed to every Dify app's file fetcher."""

from __future__ import annotations

from pathlib import Path

import pytest

import bootstrap
from adapters.inbound.config_file import ConfigError, load_settings
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


def test_unset_means_only_the_dify_origin(tmp_path: Path) -> None:
    assert load_settings(_config(tmp_path, {}), {}).file_hosts == ()


def test_listed_hosts_reach_the_dify_engine(tmp_path: Path) -> None:
    settings = load_settings(_config(tmp_path, {"FILE_HOSTS": "cdn.example.com, oss.example.com:8443"}), {})
    assert settings.file_hosts == ("cdn.example.com", "oss.example.com:8443")
    engine = bootstrap.build_dify(settings)
    try:
        assert engine.file_hosts == frozenset({("cdn.example.com", None), ("oss.example.com", 8443)})
    finally:
        import asyncio

        asyncio.run(engine.aclose())


@pytest.mark.parametrize("entry", ["http://cdn.example.com", "cdn.example.com/path", "x:0", "x:70000", "a b"])
def test_a_malformed_entry_is_refused_at_start(tmp_path: Path, entry: str) -> None:
    with pytest.raises(ConfigError, match="FILE_HOSTS"):
        load_settings(_config(tmp_path, {"FILE_HOSTS": entry}), {})
