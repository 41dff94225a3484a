"""The operator's configuration: the original system's config.ini, new keys, and environment overrides.

Lookup order for every key: environment variable, then the file, then the default. Environment names:
- keys of [CONFIG]: the key itself (`CORP_SECRET`) or `KFDIFY_CORP_SECRET`;
- keys of other sections: `SECTION_KEY` (`MEMCACHE_HOST`, `SERVER_PORT`) or `KFDIFY_SECTION_KEY`.
The `KFDIFY_` form wins when both are set. Bad settings are collected and reported together.
"""

from __future__ import annotations

import configparser
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

# The value parsers (config_values.py) under the short private names load_settings reads them by.
from adapters.inbound.config_values import file_hosts as _file_hosts
from adapters.inbound.config_values import header_size as _header_size
from adapters.inbound.config_values import http_url as _url
from adapters.inbound.config_values import on_off as _on_off
from adapters.inbound.config_values import port_number as _port
from adapters.inbound.config_values import positive_float as _positive_float
from adapters.inbound.config_values import positive_int as _positive_int
from adapters.inbound.config_values import servers as _servers
from adapters.inbound.config_values import timeout_s as _timeout
from adapters.inbound.config_values import words as _words
from domain.message_text import DEFAULT_MESSAGE_TEMPLATES, template_problem

T = TypeVar("T")

# [TEXTS] msg_<msgtype>: how a non-text message is asked in words; an EMPTY value is a setting of its own
# (that msgtype gets the `unsupported` reply), not "unset".
MESSAGE_TEMPLATE_KEYS = tuple(DEFAULT_MESSAGE_TEMPLATES)

ENV_PREFIX = "KFDIFY_"
MAIN = "CONFIG"


class ConfigError(Exception):
    """Every bad or missing setting, each with what is expected."""

    def __init__(self, problems: list[str], source: str) -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"configuration is not usable ({source}):\n{lines}")


@dataclass(frozen=True, slots=True)
class MemcacheSettings:
    servers: tuple[tuple[str, int], ...]
    connect_timeout: float = 5.0
    timeout: float = 5.0
    prefix: str = "kfdify"


@dataclass(frozen=True, slots=True)
class KfRouteSettings:
    """A [KF:<open_kfid>] section: that account's own Dify app and texts."""

    open_kfid: str
    dify_api_base: str
    dify_api_key: str
    texts: dict[str, str] = field(default_factory=dict)
    # Handoff target of this account ("" = the [BOT] SERVICER_USERID, or the queue).
    servicer_userid: str = ""


@dataclass(frozen=True, slots=True)
class Settings:
    corp_id: str
    corp_secret: str
    token: str
    encoding_aes_key: str
    dify_api_base: str
    dify_api_key: str
    agent_id: str = ""
    wecom_api_base: str = "https://qyapi.weixin.qq.com"
    admin_token: str = ""
    dify_response_mode: str = "streaming"
    log_level: str = "INFO"
    log_format: str = "text"
    host: str = "0.0.0.0"
    port: int = 11850
    shutdown_grace_s: float = 20.0
    # A second listener for the admin endpoints and /metrics (None: everything on `port`).
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None
    # Bounds on a request head (request line + headers), whatever the HTTP parser.
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    memcache: MemcacheSettings | None = None
    # [BOT]: behaviour knobs, already typed.
    max_message_age_s: float = 600.0
    conversation_idle_ttl_s: float = 86400.0
    dify_concurrency: int = 1000
    dify_connect_timeout_s: float = 10.0
    dify_idle_timeout_s: float = 45.0
    dify_total_timeout_s: float = 180.0
    dify_retries: int = 1
    dify_inputs: dict[str, str] = field(default_factory=dict)
    interim_after_s: float = 5.0
    reset_words: tuple[str, ...] = ()
    handoff_words: tuple[str, ...] = ()
    handoff_markers: tuple[str, ...] = ()
    servicer_userid: str = ""
    session_state_ttl_s: float = 60.0
    rate_limit: int = 20
    rate_limit_window_s: float = 60.0
    recovery_interval_s: float = 60.0
    message_lease_s: float = 60.0
    pull_lease_s: float = 15.0
    # Customer context (issue #17): dislike feedback on the answer a customer asked for a human right after.
    feedback_window_s: float = 600.0
    handoff_feedback: bool = True
    # Media: image + text pairing, and the ffmpeg that turns voice into speech audio.
    image_text_window_s: float = 3.0
    # Texts of one customer within this many seconds of each other are one question (0 = off).
    merge_window_s: float = 0.0
    # Hosts (host or host:port) besides the Dify app's own origin that answer files may be fetched from.
    file_hosts: tuple[str, ...] = ()
    ffmpeg: str = ""  # "" = ffmpeg on PATH, else the imageio-ffmpeg package's; "off" = no voice
    ffmpeg_timeout_s: float = 30.0
    voice_format: str = "wav"
    # Suggested questions after an answer as a menu: follow the app's setting (True) or never (False).
    suggestions: bool = True
    dify_min_concurrency: int = 4
    texts: dict[str, str] = field(default_factory=dict)
    kf_routes: tuple[KfRouteSettings, ...] = ()
    source: str = ""

    def secrets(self) -> tuple[str, ...]:
        """Values that must never appear in logs, errors or /status."""
        values = [self.corp_secret, self.token, self.encoding_aes_key, self.dify_api_key, self.admin_token]
        values += [r.dify_api_key for r in self.kf_routes]
        return tuple(v for v in values if v)


TEXT_KEYS = (
    "fallback",
    "unsupported",
    "reset_done",
    "truncated",
    "interim",
    "handoff",
    "handoff_failed",
    "rate_limited",
    "welcome",
    "image_query",
    "file_query",
    "media_expired",
    "media_failed",
    "too_large",
    "file_type_not_accepted",
    "voice_failed",
    "answer_files",
    "needs_human_input",
    *MESSAGE_TEMPLATE_KEYS,
    "suggestions_head",
    "conversation_name",
)


class _Reader:
    def __init__(self, parser: configparser.ConfigParser, environ: Mapping[str, str]) -> None:
        self.parser = parser
        self.environ = environ
        self.problems: list[str] = []

    def env_names(self, section: str, key: str) -> tuple[str, ...]:
        key = key.upper()
        if section.upper() == MAIN:
            return (ENV_PREFIX + key, key)
        flat = f"{section.upper()}_{key}"
        return (ENV_PREFIX + flat, flat)

    def raw(self, section: str, key: str) -> str | None:
        for name in self.env_names(section, key):
            value = self.environ.get(name)
            if value is not None and value.strip() != "":
                return value.strip()
        if self.parser.has_option(section, key):
            value = self.parser.get(section, key).strip()
            return value if value != "" else None
        return None

    def where(self, section: str, key: str) -> str:
        return f"[{section}] {key} (env {self.env_names(section, key)[0]})"

    def text(self, section: str, key: str, default: str | None = None, *, required: bool = False) -> str:
        value = self.raw(section, key)
        if value is None:
            if required:
                self.problems.append(f"{self.where(section, key)} is missing")
            return default or ""
        if required and value.lower().startswith("your_"):
            self.problems.append(f"{self.where(section, key)} still holds the example placeholder {value!r}")
        return value

    def typed(self, section: str, key: str, default: T, cast: Callable[[str], T], expected: str) -> T:
        value = self.raw(section, key)
        if value is None:
            return default
        try:
            return cast(value)
        except (TypeError, ValueError):
            self.problems.append(f"{self.where(section, key)} = {value!r}: expected {expected}")
            return default


def _admin_port(r: _Reader) -> int | None:
    """[SERVER] ADMIN_PORT: unset = admin endpoints on the main port; else a port other than PORT."""
    port = r.typed("SERVER", "ADMIN_PORT", None, _port, "a port number 1-65535 (other than PORT)")
    if port is None:
        return None
    main = r.raw("SERVER", "PORT")
    if port == (int(main) if main and main.isdigit() else 11850):
        r.problems.append(f"{r.where('SERVER', 'ADMIN_PORT')} = {port}: must differ from PORT")
        return None
    return port


_AES_KEY = re.compile(r"^[A-Za-z0-9]{43}$")


def load_settings(path: str | None, environ: Mapping[str, str]) -> Settings:
    """Read `path` (None: ./config.ini if present) and the environment. Raises ConfigError."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    explicit = path is not None
    file = Path(path or "config.ini")
    source = str(file)
    pre_problems: list[str] = []
    if file.is_file():
        try:
            with file.open(encoding="utf-8-sig") as handle:
                parser.read_file(handle)
        except (configparser.Error, UnicodeDecodeError, OSError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError([f"cannot read the file: {first}"], source) from None
    elif explicit:
        pre_problems.append(f"no configuration file at {file} (copy config.example.ini and fill it in)")
    else:
        source = "environment (no ./config.ini)"
    r = _Reader(parser, environ)
    r.problems.extend(pre_problems)

    corp_id = r.text(MAIN, "CORP_ID", required=True)
    corp_secret = r.text(MAIN, "CORP_SECRET", required=True)
    token = r.text(MAIN, "TOKEN", required=True)
    if token and (len(token) > 128 or any(c.isspace() for c in token)):
        r.problems.append(
            f"{r.where(MAIN, 'TOKEN')}: expected the callback Token from WeCom (letters/digits)"
        )
    aes_key = r.text(MAIN, "ENCODING_AES_KEY", required=True)
    if aes_key and not aes_key.lower().startswith("your_") and not _AES_KEY.match(aes_key):
        r.problems.append(
            f"{r.where(MAIN, 'ENCODING_AES_KEY')}: expected exactly 43 letters and digits "
            f"(got {len(aes_key)} characters)"
        )
    dify_base = r.text(MAIN, "DIFY_API_BASE", required=True)
    if dify_base and not dify_base.lower().startswith("your_"):
        dify_base = r.typed(
            MAIN, "DIFY_API_BASE", dify_base, _url, "an http(s) URL such as https://api.dify.ai/v1"
        )
    dify_key = r.text(MAIN, "DIFY_API_KEY", required=True)
    wecom_base = r.typed(
        MAIN, "WECOM_API_BASE", "https://qyapi.weixin.qq.com", _url, "an http(s) URL (default WeCom's)"
    )
    mode = r.text(MAIN, "DIFY_RESPONSE_MODE", "streaming").lower()
    if mode not in ("streaming", "blocking"):
        r.problems.append(f"{r.where(MAIN, 'DIFY_RESPONSE_MODE')} = {mode!r}: expected streaming or blocking")
        mode = "streaming"
    log_level = r.text(MAIN, "LOG_LEVEL", "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        r.problems.append(
            f"{r.where(MAIN, 'LOG_LEVEL')} = {log_level!r}: expected DEBUG, INFO, WARNING or ERROR"
        )
        log_level = "INFO"
    log_format = r.text(MAIN, "LOG_FORMAT", "text").lower()
    if log_format not in ("text", "json"):
        r.problems.append(f"{r.where(MAIN, 'LOG_FORMAT')} = {log_format!r}: expected text or json")
        log_format = "text"

    memcache = _memcache(r)
    inputs_raw = r.raw("BOT", "DIFY_INPUTS")
    inputs: dict[str, str] = {}
    if inputs_raw:
        try:
            parsed: Any = json.loads(inputs_raw)
            if not isinstance(parsed, dict):
                raise ValueError
            inputs = {str(k): str(v) for k, v in parsed.items()}
        except ValueError:
            r.problems.append(
                f'{r.where("BOT", "DIFY_INPUTS")}: expected a JSON object like {{"lang": "zh"}}'
            )

    texts = {k: v for k in TEXT_KEYS if (v := r.raw("TEXTS", k)) is not None}
    texts.update(_switched_off_templates(r))
    _check_templates(r, "[TEXTS]", texts)
    settings = Settings(
        corp_id=corp_id,
        corp_secret=corp_secret,
        token=token,
        encoding_aes_key=aes_key,
        dify_api_base=dify_base,
        dify_api_key=dify_key,
        agent_id=r.text(MAIN, "AGENT_ID", ""),
        wecom_api_base=wecom_base,
        admin_token=r.text(MAIN, "ADMIN_TOKEN", ""),
        dify_response_mode=mode,
        log_level=log_level,
        log_format=log_format,
        host=r.text("SERVER", "HOST", "0.0.0.0"),
        port=r.typed("SERVER", "PORT", 11850, _port, "a port number 1-65535"),
        shutdown_grace_s=r.typed("SERVER", "SHUTDOWN_GRACE", 20.0, _positive_float, "seconds (a number ≥ 0)"),
        admin_host=r.text("SERVER", "ADMIN_HOST", "127.0.0.1"),
        admin_port=_admin_port(r),
        max_header_bytes=r.typed(
            "SERVER", "MAX_HEADER_SIZE", 64 * 1024, _header_size, "bytes, a whole number from 4096 to 1048576"
        ),
        header_timeout_s=r.typed("SERVER", "HEADER_TIMEOUT", 10.0, _timeout, "seconds (a number > 0)"),
        memcache=memcache,
        max_message_age_s=r.typed("BOT", "MAX_MESSAGE_AGE", 600.0, _positive_float, "seconds (a number ≥ 0)"),
        conversation_idle_ttl_s=r.typed(
            "BOT", "CONVERSATION_IDLE_TTL", 86400.0, _positive_float, "seconds (a number ≥ 0)"
        ),
        dify_concurrency=max(
            1, r.typed("BOT", "DIFY_CONCURRENCY", 1000, _positive_int, "a whole number ≥ 1")
        ),
        dify_connect_timeout_s=r.typed("BOT", "DIFY_CONNECT_TIMEOUT", 10.0, _positive_float, "seconds"),
        dify_idle_timeout_s=r.typed("BOT", "DIFY_IDLE_TIMEOUT", 45.0, _positive_float, "seconds"),
        dify_total_timeout_s=r.typed("BOT", "DIFY_TOTAL_TIMEOUT", 180.0, _positive_float, "seconds"),
        dify_retries=r.typed("BOT", "DIFY_RETRIES", 1, _positive_int, "a whole number ≥ 0"),
        dify_inputs=inputs,
        interim_after_s=r.typed("BOT", "INTERIM_AFTER", 5.0, _positive_float, "seconds (0 = off)"),
        reset_words=r.typed("BOT", "RESET_WORDS", (), _words, "words separated by commas"),
        handoff_words=r.typed("BOT", "HANDOFF_WORDS", (), _words, "words separated by commas"),
        handoff_markers=r.typed("BOT", "HANDOFF_MARKERS", (), _words, "markers separated by commas"),
        servicer_userid=r.text("BOT", "SERVICER_USERID", ""),
        session_state_ttl_s=r.typed("BOT", "SESSION_STATE_TTL", 60.0, _positive_float, "seconds"),
        rate_limit=r.typed("BOT", "RATE_LIMIT", 20, _positive_int, "messages per window (0 = off)"),
        rate_limit_window_s=r.typed("BOT", "RATE_LIMIT_WINDOW", 60.0, _positive_float, "seconds"),
        recovery_interval_s=r.typed("BOT", "RECOVERY_INTERVAL", 60.0, _positive_float, "seconds (0 = off)"),
        message_lease_s=max(1.0, r.typed("BOT", "MESSAGE_LEASE", 60.0, _positive_float, "seconds ≥ 1")),
        pull_lease_s=max(1.0, r.typed("BOT", "PULL_LEASE", 15.0, _positive_float, "seconds ≥ 1")),
        feedback_window_s=r.typed("BOT", "FEEDBACK_WINDOW", 600.0, _positive_float, "seconds (a number ≥ 0)"),
        handoff_feedback=r.typed("BOT", "HANDOFF_FEEDBACK", True, _on_off, "on or off"),
        image_text_window_s=r.typed(
            "BOT", "IMAGE_TEXT_WINDOW", 3.0, _positive_float, "seconds (0 = never wait for a text)"
        ),
        merge_window_s=r.typed("BOT", "MERGE_WINDOW", 0.0, _positive_float, "seconds (0 = off)"),
        file_hosts=r.typed("BOT", "FILE_HOSTS", (), _file_hosts, "host or host:port, separated by commas"),
        ffmpeg=r.text("BOT", "FFMPEG", ""),
        ffmpeg_timeout_s=max(1.0, r.typed("BOT", "FFMPEG_TIMEOUT", 30.0, _positive_float, "seconds ≥ 1")),
        voice_format=_voice_format(r),
        suggestions=r.typed("BOT", "SUGGESTIONS", True, _on_off, "on or off"),
        dify_min_concurrency=max(
            1, r.typed("BOT", "DIFY_MIN_CONCURRENCY", 4, _positive_int, "a whole number ≥ 1")
        ),
        texts=texts,
        kf_routes=_routes(r, dify_key),
        source=source,
    )
    if r.problems:
        raise ConfigError(r.problems, source)
    return settings


def _voice_format(r: _Reader) -> str:
    value = r.text("BOT", "VOICE_FORMAT", "wav").lower()
    if value not in ("wav", "mp3"):
        r.problems.append(f"{r.where('BOT', 'VOICE_FORMAT')} = {value!r}: expected wav or mp3")
        return "wav"
    return value


def _memcache(r: _Reader) -> MemcacheSettings | None:
    section = "MEMCACHE"
    backend = r.text(section, "backend", "").lower()
    has_section = r.parser.has_section(section)
    servers_raw = r.raw(section, "servers")
    host = r.raw(section, "host")
    if backend not in ("", "memory", "memcached"):
        r.problems.append(f"{r.where(section, 'backend')} = {backend!r}: expected memcached or memory")
        return None
    if backend == "memory":
        return None
    if not (backend == "memcached" or has_section or servers_raw or host):
        return None
    servers: tuple[tuple[str, int], ...]
    if servers_raw:
        servers = r.typed(section, "servers", (), _servers, "host:port[,host:port...]")
    else:
        port = r.typed(section, "port", 11211, _port, "a port number 1-65535")
        servers = ((host or "localhost", port),)
    return MemcacheSettings(
        servers=servers,
        connect_timeout=r.typed(section, "connect_timeout", 5.0, _positive_float, "seconds"),
        timeout=r.typed(section, "timeout", 5.0, _positive_float, "seconds"),
        prefix=r.text(section, "prefix", "kfdify"),
    )


def _routes(r: _Reader, default_key: str) -> tuple[KfRouteSettings, ...]:
    routes = []
    for section in r.parser.sections():
        if not section.upper().startswith("KF:"):
            continue
        open_kfid = section.split(":", 1)[1].strip()
        base = r.parser.get(section, "DIFY_API_BASE", fallback="").strip()
        key = r.parser.get(section, "DIFY_API_KEY", fallback="").strip()
        if not open_kfid:
            r.problems.append(f"[{section}]: expected [KF:<open_kfid>]")
            continue
        if base:
            try:
                base = _url(base)
            except ValueError:
                r.problems.append(f"[{section}] DIFY_API_BASE = {base!r}: expected an http(s) URL")
        texts = {k: r.parser.get(section, k).strip() for k in TEXT_KEYS if r.parser.has_option(section, k)}
        _check_templates(r, f"[{section}]", texts)
        servicer = r.parser.get(section, "SERVICER_USERID", fallback="").strip()
        routes.append(KfRouteSettings(open_kfid, base, key or default_key, texts, servicer))
    return tuple(routes)


def _switched_off_templates(r: _Reader) -> dict[str, str]:
    """The msg_* keys of [TEXTS] set to nothing (in the file, or by an environment variable that is set
    but empty): "" switches that msgtype back to the `unsupported` reply."""
    off = {}
    for key in MESSAGE_TEMPLATE_KEYS:
        if r.raw("TEXTS", key) is not None:
            continue
        in_env = any(name in r.environ for name in r.env_names("TEXTS", key))
        if in_env or r.parser.has_option("TEXTS", key):
            off[key] = ""
    return off


def _check_templates(r: _Reader, where: str, texts: Mapping[str, str]) -> None:
    """A message template the bot could not render is refused at start, not found out by a customer."""
    for key in MESSAGE_TEMPLATE_KEYS:
        template = texts.get(key)
        if template:
            problem = template_problem(key, template.replace("\\n", "\n"))
            if problem is not None:
                r.problems.append(f"{where} {problem}")
