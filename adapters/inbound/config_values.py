"""Parsers of single configuration values (config_file.py reads them with `_Reader.typed`): each takes the
text as written and returns the value, or raises ValueError, which the reader reports with the key's name."""

from __future__ import annotations

import re
from urllib.parse import urlparse


def positive_float(value: str) -> float:
    number = float(value)
    if number < 0:
        raise ValueError(value)
    return number


def port_number(value: str) -> int:
    number = int(value)
    if not 0 < number < 65536:
        raise ValueError(value)
    return number


def positive_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(value)
    return number


def header_size(value: str) -> int:
    number = int(value)
    if not 4096 <= number <= 1024 * 1024:
        raise ValueError(value)
    return number


def timeout_s(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(value)
    return number


FILE_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(\d{1,5}))?")


def file_hosts(value: str) -> tuple[str, ...]:
    """[BOT] FILE_HOSTS: `host`, `host:port`, `[v6]` or `[v6]:port`, separated by commas."""
    hosts = words(value)
    for host in hosts:
        match = FILE_HOST.fullmatch(host)
        if match is None or (match.group(1) is not None and not 0 < int(match.group(1)) < 65536):
            raise ValueError(host)
    return hosts


def on_off(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("on", "yes", "true", "1"):
        return True
    if lowered in ("off", "no", "false", "0"):
        return False
    raise ValueError(value)


def words(value: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in re.split(r"[,，|\n]", value) if w.strip())


def http_url(value: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(value)
    return value.rstrip("/")


def servers(value: str) -> tuple[tuple[str, int], ...]:
    out = []
    for item in (s.strip() for s in value.split(",")):
        if not item:
            continue
        host, _, port = item.rpartition(":")
        if not host:
            raise ValueError(item)
        out.append((host.strip("[]"), port_number(port)))
    if not out:
        raise ValueError(value)
    return tuple(out)
