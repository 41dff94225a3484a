"""`python bootstrap.py check`: validate the configuration and try every dependency, with a hint per failure.

Output, one line per check (secrets never appear; every dependency call is bounded by a timeout):

    OK   config: config.ini
    FAIL wecom: gettoken refused: errcode 40001 invalid credential
         hint: wrong CORP_SECRET (or the app is disabled): ...
    WARN admin: ADMIN_TOKEN is not set
    summary: 1 failed, 1 warning, 4 OK -- fix the FAIL lines and run `python bootstrap.py check` again

The caller passes factories (settings → adapter), so this inbound adapter never imports the outbound ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TextIO, TypeVar

from adapters.inbound.config_file import Settings
from adapters.inbound.wecom_crypto import WeComCrypto
from application.app_inputs import FILLABLE
from application.errors import ChatEngineError, WeComError
from application.hints import DIFY_UNREACHABLE, dify_hint_for, wecom_hint_for
from domain.app_form import unfillable_required

T = TypeVar("T")

DEFAULT_TIMEOUT_S: Final = 15.0
CHAT_MODES: Final = frozenset({"chat", "agent-chat", "advanced-chat", "agent"})
STREAMING_ONLY_MODES: Final = frozenset({"agent-chat", "agent"})
_MAX_DETAIL: Final = 300
_REDACTED: Final = "***"

Factory = Callable[[Settings], Any]


class _Timeout(Exception):
    pass


class Report:
    """Prints the check lines and counts the outcomes. Every line goes through the secret scrubber."""

    def __init__(self, out: TextIO, secrets: Sequence[str] = ()) -> None:
        self._out = out
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self.ok_count = 0
        self.failed = 0
        self.warnings = 0

    def ok(self, check: str, detail: str) -> None:
        self.ok_count += 1
        self._line(f"OK   {check}: {detail}")

    def fail(self, check: str, detail: str, hint: str) -> None:
        self.failed += 1
        self._line(f"FAIL {check}: {detail}")
        self._line(f"     hint: {hint}")

    def warn(self, check: str, detail: str) -> None:
        self.warnings += 1
        self._line(f"WARN {check}: {detail}")

    def summary(self, text: str) -> None:
        self._line(f"summary: {text}")

    def _line(self, text: str) -> None:
        for secret in self._secrets:
            text = text.replace(secret, _REDACTED)
        self._out.write(text + "\n")
        self._out.flush()


def run_check(
    settings: Settings | None,
    config_problems: Sequence[str],
    *,
    channel_factory: Factory,
    engine_factory: Factory,
    store_factory: Factory,
    out: TextIO,
    config_source: str = "",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    voice_probe: Callable[[Settings], str | None] | None = None,
) -> int:
    """Run every check and print the report. 0 when nothing failed, 1 otherwise.

    `settings` is None exactly when the configuration could not be loaded; `config_problems` then lists why
    (ConfigError.problems) and `config_source` may name the file (ConfigError.source).
    """
    if settings is None or config_problems:
        report = Report(out, settings.secrets() if settings is not None else ())
        _report_config_problems(report, config_problems or ["the configuration could not be loaded"])
        where = f" ({config_source})" if config_source else ""
        report.summary(
            f"configuration not usable{where}: {report.failed} problem(s); nothing else was checked -- "
            "fix the FAIL lines and run `python bootstrap.py check` again"
        )
        return 1
    report = Report(out, settings.secrets())
    asyncio.run(
        _run_checks(
            settings,
            report,
            channel_factory=channel_factory,
            engine_factory=engine_factory,
            store_factory=store_factory,
            timeout_s=timeout_s,
        )
    )
    if voice_probe is not None:
        check_voice(settings, report, voice_probe)
    counts = f"{report.failed} failed, {report.warnings} warning(s), {report.ok_count} OK"
    if report.failed:
        report.summary(f"{counts} -- fix the FAIL lines and run `python bootstrap.py check` again")
        return 1
    report.summary(f"{counts} -- ready to serve")
    return 0


async def _run_checks(
    settings: Settings,
    report: Report,
    *,
    channel_factory: Factory,
    engine_factory: Factory,
    store_factory: Factory,
    timeout_s: float,
) -> None:
    report.ok("config", settings.source or "loaded")
    check_callback_crypto(settings, report)
    await check_wecom(settings, report, channel_factory, timeout_s)
    await check_dify(settings, report, engine_factory, timeout_s)
    await check_store(settings, report, store_factory, timeout_s)
    check_admin(settings, report)


# --- a. config ----------------------------------------------------------------------------------------

_AES_HINT: Final = (
    "must be the 43-character EncodingAESKey from the WeCom callback settings (letters and digits, "
    "no trailing '=')"
)
# (substring of the problem, where to find the right value), first match wins.
_WHERE_TO_FIND: Final[tuple[tuple[str, str], ...]] = (
    ("ENCODING_AES_KEY", _AES_HINT),
    ("CORP_SECRET", "the Secret of the self-built app listed under 微信客服 → 可调用接口的应用"),
    ("CORP_ID", "the 企业ID (ww...) from the WeCom admin console → 我的企业 → 企业信息"),
    ("TOKEN", "the Token from the WeCom callback settings (接收消息 → 设置API接收), letters and digits"),
    ("DIFY_API_BASE", "the API base URL from Dify → 访问 API, ending in /v1 (e.g. https://api.dify.ai/v1)"),
    ("DIFY_API_KEY", "the app's API key from Dify → 访问 API (app-...)"),
    ("DIFY_RESPONSE_MODE", "streaming (recommended) or blocking"),
    ("DIFY_INPUTS", 'a JSON object on one line, e.g. {"lang": "zh"}'),
    ("[MEMCACHE]", "host:port of a reachable memcached (or remove [MEMCACHE] for the in-process store)"),
    ("[SERVER]", "see config.example.ini for the expected values"),
    ("[BOT]", "see config.example.ini for the expected values"),
)


def config_hint(problem: str) -> str:
    """What to do about one ConfigError problem."""
    if "no configuration file" in problem:
        return "copy config.example.ini to config.ini and fill it in, or pass --config PATH"
    if "cannot read the file" in problem:
        return "the file must be UTF-8 text in INI format with a [CONFIG] section (see config.example.ini)"
    where = next((text for key, text in _WHERE_TO_FIND if key in problem), "")
    if "placeholder" in problem:
        return f"replace the example value{': ' + where if where else ''}"
    if "ENCODING_AES_KEY" in problem:
        return _AES_HINT
    if problem.rstrip().endswith("is missing"):
        what = f": {where}" if where else ""
        return f"set it in the config file or the environment variable named above{what}"
    return where or "see config.example.ini for the expected format"


def _report_config_problems(report: Report, problems: Sequence[str]) -> None:
    for problem in problems:
        report.fail("config", problem, config_hint(problem))


# --- b. callback crypto -------------------------------------------------------------------------------


def check_callback_crypto(settings: Settings, report: Report) -> None:
    """Token and EncodingAESKey usable: the key is 43 alphanumerics decoding to 32 bytes, and a callback
    encrypted with them decrypts back (the same code the webhook runs)."""
    try:
        crypto = WeComCrypto(
            token=settings.token, encoding_aes_key=settings.encoding_aes_key, receive_id=settings.corp_id
        )
    except ValueError as exc:
        hint = "set TOKEN to the Token from the WeCom callback settings (接收消息 → 设置API接收)"
        if "EncodingAESKey" in str(exc):
            hint = f"ENCODING_AES_KEY {_AES_HINT}"
        report.fail("callback crypto", _clip(str(exc)), hint)
        return
    try:
        probe = "<xml><Event><![CDATA[kf_msg_or_event]]></Event></xml>"
        body, signature = crypto.encrypt_callback(probe, timestamp="1700000000", nonce="check")
        roundtrip = crypto.decrypt_callback(
            msg_signature=signature, timestamp="1700000000", nonce="check", body=body
        )
    except Exception as exc:  # the crypto is ours: anything here is a bug worth showing
        report.fail(
            "callback crypto",
            f"self-test failed: {type(exc).__name__}",
            "re-copy TOKEN and ENCODING_AES_KEY from the WeCom callback settings",
        )
        return
    if roundtrip != probe:
        report.fail(
            "callback crypto",
            "self-test failed: decrypted text differs",
            "re-copy TOKEN and ENCODING_AES_KEY from the WeCom callback settings",
        )
        return
    report.ok(
        "callback crypto", "TOKEN and ENCODING_AES_KEY are well-formed (encrypt/decrypt self-test passed)"
    )


# --- c. wecom -----------------------------------------------------------------------------------------


def wecom_hint(exc: WeComError, settings: Settings) -> str:
    return wecom_hint_for(exc.errcode, exc.errmsg, settings.wecom_api_base)


async def check_wecom(settings: Settings, report: Report, channel_factory: Factory, timeout_s: float) -> None:
    try:
        channel = channel_factory(settings)
    except Exception as exc:
        report.fail(
            "wecom",
            f"cannot create the client: {_describe(exc)}",
            "check CORP_ID, CORP_SECRET, WECOM_API_BASE",
        )
        return
    try:
        await _bounded(channel.check_access(), timeout_s)
    except _Timeout:
        report.fail(
            "wecom",
            f"timed out after {timeout_s:g} s",
            "WeCom API unreachable: check network/proxy and WECOM_API_BASE",
        )
    except WeComError as exc:
        if exc.errcode is None:
            detail = f"gettoken failed: {exc.errmsg or 'no answer'}"
        else:
            detail = f"gettoken refused: errcode {exc.errcode} {exc.errmsg}".rstrip()
        report.fail("wecom", _clip(detail), wecom_hint(exc, settings))
    except Exception as exc:
        report.fail(
            "wecom", f"unexpected error: {_describe(exc)}", "run with LOG_LEVEL = DEBUG and check the log"
        )
    else:
        report.ok("wecom", f"access token obtained for corp {settings.corp_id} ({settings.wecom_api_base})")
    finally:
        await _close(channel, timeout_s)


# --- d. dify ------------------------------------------------------------------------------------------


_DIFY_UNREACHABLE: Final = DIFY_UNREACHABLE


def dify_hint(exc: ChatEngineError) -> str:
    return dify_hint_for(exc.code, exc.status)


def _dify_apps(settings: Settings) -> list[tuple[str, Settings]]:
    """(label, settings) for the default app and every [KF:...] section that names another app."""
    apps = [("dify", settings)]
    seen = {(settings.dify_api_base, settings.dify_api_key)}
    for route in settings.kf_routes:
        base = route.dify_api_base or settings.dify_api_base
        if (base, route.dify_api_key) in seen:
            continue
        seen.add((base, route.dify_api_key))
        apps.append(
            (
                f"dify [KF:{route.open_kfid}]",
                dataclasses.replace(settings, dify_api_base=base, dify_api_key=route.dify_api_key),
            )
        )
    return apps


async def check_dify(settings: Settings, report: Report, engine_factory: Factory, timeout_s: float) -> None:
    for label, app_settings in _dify_apps(settings):
        await _check_one_dify(label, app_settings, report, engine_factory, timeout_s)


async def _check_one_dify(
    label: str, settings: Settings, report: Report, engine_factory: Factory, timeout_s: float
) -> None:
    try:
        engine = engine_factory(settings)
    except Exception as exc:
        report.fail(
            label, f"cannot create the client: {_describe(exc)}", "check DIFY_API_BASE and DIFY_RESPONSE_MODE"
        )
        return
    try:
        info = await _bounded(engine.info(), timeout_s)
        parameters = await _bounded(engine.parameters(), timeout_s)
    except _Timeout:
        report.fail(
            label,
            f"timed out after {timeout_s:g} s",
            _DIFY_UNREACHABLE,
        )
        return
    except ChatEngineError as exc:
        status = f" (HTTP {exc.status})" if exc.status is not None else ""
        detail = f"{exc.code}{status}" + (f": {exc.message}" if exc.message else "")
        report.fail(label, _clip(f"{settings.dify_api_base}: {detail}"), dify_hint(exc))
        return
    except Exception as exc:
        report.fail(
            label, f"unexpected error: {_describe(exc)}", "run with LOG_LEVEL = DEBUG and check the log"
        )
        return
    finally:
        await _close(engine, timeout_s)
    name = getattr(info, "name", "") or "(unnamed)"
    mode = getattr(info, "mode", "") or ""
    report.ok(label, f"app {name!r}, mode {mode or 'not reported'}, at {settings.dify_api_base}")
    if mode and mode not in CHAT_MODES:
        report.warn(label, f"this key belongs to a {mode} app; use a chat app's key")
    if settings.dify_response_mode == "blocking" and mode in STREAMING_ONLY_MODES:
        report.warn(label, "Agent apps only support streaming: set DIFY_RESPONSE_MODE = streaming")
    form = getattr(parameters, "input_form", ())
    missing = unfillable_required(form, fillable=FILLABLE, static=settings.dify_inputs)
    if missing:
        report.fail(
            label,
            f"the app requires input variable(s) {', '.join(missing)} that kf-dify cannot fill: Dify would "
            "refuse every question",
            "set them in [BOT] DIFY_INPUTS, or make them optional in the app (Dify: 开始 / input variables)",
        )


# --- e. store -----------------------------------------------------------------------------------------


async def check_store(settings: Settings, report: Report, store_factory: Factory, timeout_s: float) -> None:
    if settings.memcache is None:
        report.ok("store", "in-process (single instance; state lost on restart)")
        return
    where = ", ".join(f"{host}:{port}" for host, port in settings.memcache.servers)
    hint = (
        f"Memcached unreachable at {where}: start memcached (apt-get install memcached / "
        "systemctl start memcached) or fix [MEMCACHE] host/port"
    )
    try:
        store = store_factory(settings)
    except Exception as exc:
        report.fail("store", f"cannot create the client: {_describe(exc)}", hint)
        return
    try:
        reachable = await _bounded(store.ping(), timeout_s)
    except _Timeout:
        report.fail("store", f"memcached at {where}: timed out after {timeout_s:g} s", hint)
    except Exception as exc:
        report.fail("store", f"memcached at {where}: {_describe(exc)}", hint)
    else:
        if reachable:
            report.ok("store", f"memcached at {where} (prefix {settings.memcache.prefix!r})")
        else:
            report.fail("store", f"memcached at {where} does not answer", hint)
    finally:
        await _close(store, timeout_s)


# --- f. admin -----------------------------------------------------------------------------------------


# Guessing is slowed per address (adapters/inbound/auth_throttle.py), not made impossible: the token itself
# must be out of reach, 24 characters of a random URL-safe alphabet being about 140 bits.
MIN_ADMIN_TOKEN = 24


def check_admin(settings: Settings, report: Report) -> None:
    if not settings.admin_token:
        report.warn(
            "admin", "ADMIN_TOKEN is not set: admin endpoints refuse every request until ADMIN_TOKEN is set"
        )
    elif len(settings.admin_token) < MIN_ADMIN_TOKEN:
        report.warn(
            "admin",
            f"ADMIN_TOKEN is short (under {MIN_ADMIN_TOKEN} characters): use a long random value, e.g. "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'",
        )
    else:
        report.ok("admin", "ADMIN_TOKEN is set")


# --- g. voice -----------------------------------------------------------------------------------------


def check_voice(settings: Settings, report: Report, probe: Callable[[Settings], str | None]) -> None:
    """`probe` names the ffmpeg voice messages will use, or None when there is none."""
    try:
        found = probe(settings)
    except Exception as exc:  # a broken probe must not hide the other results
        found = None
        report.warn("voice", f"could not look for ffmpeg: {type(exc).__name__}")
        return
    if found:
        report.ok("voice", f"ffmpeg for voice messages: {found}")
    else:
        report.warn(
            "voice",
            "no ffmpeg found: voice messages get the 'unsupported' text; apt-get install ffmpeg, or "
            "pip install imageio-ffmpeg",
        )


# --- helpers ------------------------------------------------------------------------------------------


async def _bounded(awaitable: Awaitable[T], timeout_s: float) -> T:
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        raise _Timeout() from None


async def _close(resource: Any, timeout_s: float) -> None:
    """aclose() if the adapter has one, else close(); a failure to close is not a check failure."""
    close = getattr(resource, "aclose", None) or getattr(resource, "close", None)
    if close is None:
        return
    try:
        result = close()
        if inspect.isawaitable(result):
            await _bounded(result, timeout_s)
    except Exception:
        pass


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return _clip(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"
