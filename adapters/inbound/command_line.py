"""The command line of bootstrap.py: its arguments and how a configuration is loaded for each command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence

from adapters.inbound.config_file import ConfigError, Settings, load_settings


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bootstrap.py", description="kf-dify: WeCom kf × Dify bridge")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "check", "simulate"])
    parser.add_argument("--config", default=None, help="path to config.ini (default ./config.ini)")
    # simulate: the customer's entry and profile, to try how the app behaves for them.
    parser.add_argument("--scene", default="", help="simulate: the entry scene (enter_session's scene)")
    parser.add_argument("--scene-param", default="", help="simulate: the entry link's scene_param")
    parser.add_argument("--nickname", default="", help="simulate: the customer's WeChat nickname")
    return parser.parse_args(list(argv))


def load_or_exit(path: str | None, environ: Mapping[str, str]) -> Settings:
    """The settings, or exit 2 with the problems on stderr."""
    try:
        return load_settings(path, environ)
    except ConfigError as exc:
        print(f"kf-dify: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def load_for_check(path: str | None, environ: Mapping[str, str]) -> tuple[Settings | None, list[str], str]:
    """For `check`: the settings (None when invalid), the configuration's problems and where it came from."""
    try:
        loaded = load_settings(path, environ)
    except ConfigError as exc:
        return None, exc.problems, exc.source
    return loaded, [], loaded.source
