from __future__ import annotations

import asyncio
import dataclasses
import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.inbound.cli_check import run_check
from adapters.inbound.config_file import (
    ConfigError,
    KfRouteSettings,
    MemcacheSettings,
    Settings,
    load_settings,
)
from adapters.outbound.dify import DifyChatEngine
from adapters.outbound.memcached_store import MemcachedStateStore
from adapters.outbound.memory_store import MemoryStateStore
from adapters.outbound.wecom_api import WeComKfChannel
from adapters.outbound.wecom_paths import GETTOKEN
from application.errors import StoreUnavailable
from application.failover_store import FailoverStateStore
from tests.support.dify_server import FakeDifyServer, Fault
from tests.support.http_server import free_port, serve
from tests.support.wecom_server import FakeWeComServer

CORP_ID = "wwcheckcorp0001"
CORP_SECRET = "corp-secret-Zq8xW3vN"
TOKEN = "cbTokenK7p2"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
DIFY_KEY = "app-dify-key-Hs92kLm"
ADMIN_TOKEN = "admin-token-9f8e7d6c5b4a3210"
SECRETS = (CORP_SECRET, TOKEN, AES_KEY, DIFY_KEY, ADMIN_TOKEN)
LINE = re.compile(r"^(OK   |FAIL |WARN |     hint: |summary: )\S")


@pytest.fixture(scope="module")
def wecom() -> Iterator[tuple[FakeWeComServer, str]]:
    server = FakeWeComServer(corp_id=CORP_ID, corp_secret=CORP_SECRET)
    with serve(server.app) as url:
        yield server, url


@pytest.fixture(scope="module")
def dify_server() -> Iterator[tuple[FakeDifyServer, str]]:
    server = FakeDifyServer(api_key=DIFY_KEY, app_name="售后助手", mode="advanced-chat")
    with serve(server.app) as url:
        yield server, url


@pytest.fixture
def wecom_server(wecom: tuple[FakeWeComServer, str]) -> tuple[FakeWeComServer, str]:
    server, url = wecom
    server.reset()
    return server, url


@pytest.fixture
def dify(dify_server: tuple[FakeDifyServer, str]) -> tuple[FakeDifyServer, str]:
    server, url = dify_server
    server.faults.clear()
    server.mode = "advanced-chat"
    return server, url


def make_settings(wecom_url: str, dify_url: str, **changes: Any) -> Settings:
    settings = Settings(
        corp_id=CORP_ID,
        corp_secret=CORP_SECRET,
        token=TOKEN,
        encoding_aes_key=AES_KEY,
        dify_api_base=f"{dify_url}/v1",
        dify_api_key=DIFY_KEY,
        wecom_api_base=wecom_url,
        admin_token=ADMIN_TOKEN,
        source="/etc/kfdify/config.ini",
    )
    return dataclasses.replace(settings, **changes)


def real_channel(settings: Settings) -> WeComKfChannel:
    return WeComKfChannel(
        corp_id=settings.corp_id,
        corp_secret=settings.corp_secret,
        api_base=settings.wecom_api_base,
        timeout=5,
    )


def real_engine(settings: Settings) -> DifyChatEngine:
    return DifyChatEngine(
        base_url=settings.dify_api_base,
        api_key=settings.dify_api_key,
        response_mode=settings.dify_response_mode,
        connect_timeout=5,
        total_timeout=10,
    )


def memory_store(settings: Settings) -> MemoryStateStore:
    return MemoryStateStore()


def not_called(settings: Settings) -> Any:
    raise AssertionError("no dependency may be built when the configuration is not usable")


def check(
    settings: Settings | None,
    problems: list[str] | None = None,
    *,
    channel_factory: Callable[[Settings], Any] = real_channel,
    engine_factory: Callable[[Settings], Any] = real_engine,
    store_factory: Callable[[Settings], Any] = memory_store,
    timeout_s: float = 15.0,
) -> tuple[int, str]:
    out = io.StringIO()
    code = run_check(
        settings,
        problems or [],
        channel_factory=channel_factory,
        engine_factory=engine_factory,
        store_factory=store_factory,
        out=out,
        timeout_s=timeout_s,
    )
    text = out.getvalue()
    for line in text.splitlines():
        assert LINE.match(line), f"unexpected line shape: {line!r}"
    for secret in SECRETS:
        assert secret not in text
    return code, text


def line(text: str, prefix: str) -> str:
    """The one line that starts with `prefix` (and the hint under it, when there is one)."""
    lines = text.splitlines()
    found = [i for i, x in enumerate(lines) if x.startswith(prefix)]
    assert len(found) == 1, f"{prefix!r} in:\n{text}"
    i = found[0]
    hint = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].startswith("     hint: ") else ""
    return lines[i] + ("\n" + hint if hint else "")


class Closing:
    """Records whether the check closed it."""

    def __init__(self) -> None:
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


class HangingChannel(Closing):
    async def check_access(self) -> None:
        await asyncio.sleep(3600)


class HangingEngine(Closing):
    async def info(self) -> Any:
        await asyncio.sleep(3600)

    async def parameters(self) -> Any:
        raise AssertionError("not reached")


class ScriptedStore:
    """ping() answers `answer` (True/False), raises it, or hangs; closes synchronously, like pymemcache."""

    def __init__(self, answer: bool | BaseException | None) -> None:
        self.answer = answer
        self.closed = False

    async def ping(self) -> bool:
        if self.answer is None:
            await asyncio.sleep(3600)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return bool(self.answer)

    def close(self) -> None:
        self.closed = True


MEMCACHE = MemcacheSettings(servers=(("10.0.0.5", 11211),))


# --- everything fine ---------------------------------------------------------------------------------


def test_a_working_setup_passes_every_check(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    code, text = check(make_settings(wecom_server[1], dify[1]))

    assert code == 0
    assert [x.split(":")[0] for x in text.splitlines()] == [
        "OK   config",
        "OK   callback crypto",
        "OK   wecom",
        "OK   dify",
        "OK   store",
        "OK   admin",
        "summary",
    ]
    assert "/etc/kfdify/config.ini" in line(text, "OK   config")
    assert "'售后助手'" in line(text, "OK   dify") and "advanced-chat" in line(text, "OK   dify")
    assert line(text, "OK   store") == "OK   store: in-process (single instance; state lost on restart)"
    assert "0 failed" in line(text, "summary") and "ready to serve" in line(text, "summary")
    assert [r.path for r in dify[0].requests[-2:]] == ["/v1/info", "/v1/parameters"]


# --- a. config --------------------------------------------------------------------------------------


def test_config_problems_are_listed_with_hints_and_nothing_else_runs(tmp_path: Path) -> None:
    config = tmp_path / "config.ini"
    config.write_text(
        "[CONFIG]\n"
        f"CORP_ID = {CORP_ID}\n"
        "CORP_SECRET = your_corp_secret\n"
        f"TOKEN = {TOKEN}\n"
        f"ENCODING_AES_KEY = {AES_KEY[:42]}=\n"
        "DIFY_API_BASE = https://api.dify.ai/v1\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(str(config), {})

    code, text = check(
        None,
        caught.value.problems,
        channel_factory=not_called,
        engine_factory=not_called,
        store_factory=not_called,
    )

    assert code == 1
    assert len(caught.value.problems) == 3
    aes = line(text, "FAIL config: [CONFIG] ENCODING_AES_KEY")
    assert (
        "hint: must be the 43-character EncodingAESKey from the WeCom callback settings "
        "(letters and digits, no trailing '=')" in aes
    )
    placeholder = line(text, "FAIL config: [CONFIG] CORP_SECRET")
    assert "hint: replace the example value" in placeholder and "可调用接口的应用" in placeholder
    missing = line(text, "FAIL config: [CONFIG] DIFY_API_KEY")
    assert "is missing" in missing and "app-..." in missing
    assert "nothing else was checked" in line(text, "summary")
    assert "OK " not in text


def test_a_missing_config_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(str(tmp_path / "nope.ini"), {})

    code, text = check(
        None,
        caught.value.problems,
        channel_factory=not_called,
        engine_factory=not_called,
        store_factory=not_called,
    )

    assert code == 1
    assert "hint: copy config.example.ini to config.ini" in line(text, "FAIL config: no configuration file")


# --- b. callback crypto -----------------------------------------------------------------------------


def test_a_malformed_aes_key_fails_the_crypto_check(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    settings = make_settings(wecom_server[1], dify[1], encoding_aes_key=AES_KEY[:40] + "+/=")

    code, text = check(settings)

    assert code == 1
    failure = line(text, "FAIL callback crypto")
    assert "43" in failure and "no trailing '='" in failure
    assert "OK   wecom" in text  # the other checks still ran


def test_an_empty_token_fails_the_crypto_check(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    code, text = check(make_settings(wecom_server[1], dify[1], token=""))

    assert code == 1
    assert "hint: set TOKEN" in line(text, "FAIL callback crypto")


# --- c. wecom ---------------------------------------------------------------------------------------


def test_a_wrong_corp_secret_is_named(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    code, text = check(make_settings(wecom_server[1], dify[1], corp_secret="another-Secret-555"))

    assert code == 1
    failure = line(text, "FAIL wecom")
    assert "errcode 40001" in failure
    assert "hint: wrong CORP_SECRET (or the app is disabled)" in failure and "可调用接口的应用" in failure
    assert "another-Secret-555" not in text


def test_a_wrong_corp_id_is_named(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    code, text = check(make_settings(wecom_server[1], dify[1], corp_id="wwsomeoneelse"))

    assert code == 1
    assert "hint: wrong CORP_ID" in line(text, "FAIL wecom")


def test_another_corps_secret_is_named(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    wecom_server[0].world.fail_next(GETTOKEN, 40091, errmsg="secret is invalid")

    code, text = check(make_settings(wecom_server[1], dify[1]))

    assert code == 1
    assert "another corp or app" in line(text, "FAIL wecom")


def test_an_untrusted_ip_names_the_ip_wecom_saw(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    wecom_server[0].world.fail_next(
        GETTOKEN,
        60020,
        errmsg="not allow to access from your ip, hint: [1700000000123], from ip: 203.0.113.7, "
        "more info at https://open.work.weixin.qq.com/devtool/query?e=60020",
    )

    code, text = check(make_settings(wecom_server[1], dify[1]))

    assert code == 1
    failure = line(text, "FAIL wecom")
    assert "hint: this server's IP (203.0.113.7) is not in the app's 企业可信IP list" in failure
    assert "takes ~1 min to apply" in failure


def test_other_errcodes_get_a_generic_hint_with_the_errcode(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    wecom_server[0].world.fail_next(GETTOKEN, 48002, errmsg="api forbidden")

    code, text = check(make_settings(wecom_server[1], dify[1]))

    assert code == 1
    assert "errcode 48002" in line(text, "FAIL wecom") and "e=48002" in line(text, "FAIL wecom")


def test_an_unreachable_wecom_points_at_network_and_api_base(dify: tuple[FakeDifyServer, str]) -> None:
    code, text = check(make_settings(f"http://127.0.0.1:{free_port()}", dify[1]))

    assert code == 1
    assert "hint: WeCom API unreachable: check network/proxy and WECOM_API_BASE" in line(text, "FAIL wecom")


def test_a_hanging_wecom_times_out_and_the_channel_is_closed(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    channel = HangingChannel()

    code, text = check(
        make_settings(wecom_server[1], dify[1]), channel_factory=lambda s: channel, timeout_s=0.2
    )

    assert code == 1
    assert "timed out" in line(text, "FAIL wecom")
    assert channel.closed
    assert "OK   dify" in text


# --- d. dify ----------------------------------------------------------------------------------------


def test_a_wrong_dify_key_is_named(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    code, text = check(make_settings(wecom_server[1], dify[1], dify_api_key="app-wrong-Key-000"))

    assert code == 1
    failure = line(text, "FAIL dify")
    assert "401" in failure
    assert "hint: DIFY_API_KEY is wrong: use the app's API key from Dify → 访问 API (app-...)" in failure
    assert "app-wrong-Key-000" not in text


def test_a_disabled_dify_app_is_named(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    body = {"code": "forbidden", "message": "The app's API service has been disabled.", "status": 403}
    dify[0].inject(Fault(path="/v1/info", status=403, body=body))

    code, text = check(make_settings(wecom_server[1], dify[1]))

    assert code == 1
    assert "disabled" in line(text, "FAIL dify").split("hint:")[1]


def test_a_dify_base_without_v1_is_named(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    code, text = check(make_settings(wecom_server[1], dify[1], dify_api_base=dify[1]))

    assert code == 1
    assert "hint: DIFY_API_BASE path is wrong (it must end in /v1)" in line(text, "FAIL dify")


def test_an_unreachable_dify_is_named(wecom_server: tuple[FakeWeComServer, str]) -> None:
    code, text = check(make_settings(wecom_server[1], f"http://127.0.0.1:{free_port()}"))

    assert code == 1
    assert "hint: Dify unreachable at DIFY_API_BASE: check the URL ends with /v1" in line(text, "FAIL dify")


def test_parameters_are_checked_too(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    body = {"code": "app_unavailable", "message": "App unavailable", "status": 400}
    dify[0].inject(Fault(path="/v1/parameters", status=400, body=body))

    code, text = check(make_settings(wecom_server[1], dify[1]))

    assert code == 1
    assert "publish" in line(text, "FAIL dify")


def test_a_hanging_dify_times_out_and_the_engine_is_closed(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    engine = HangingEngine()

    code, text = check(
        make_settings(wecom_server[1], dify[1]), engine_factory=lambda s: engine, timeout_s=0.2
    )

    assert code == 1
    assert "timed out" in line(text, "FAIL dify")
    assert engine.closed


@pytest.mark.parametrize("mode", ["agent-chat", "agent"])
def test_blocking_mode_with_an_agent_app_warns(
    mode: str, wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    dify[0].mode = mode

    code, text = check(make_settings(wecom_server[1], dify[1], dify_response_mode="blocking"))

    assert code == 0
    assert line(text, "WARN dify") == (
        "WARN dify: Agent apps only support streaming: set DIFY_RESPONSE_MODE = streaming"
    )


def test_streaming_mode_with_an_agent_app_does_not_warn(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    dify[0].mode = "agent-chat"

    code, text = check(make_settings(wecom_server[1], dify[1]))

    assert code == 0
    assert "WARN" not in text


def test_a_key_of_a_non_chat_app_warns(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    dify[0].mode = "workflow"

    code, text = check(make_settings(wecom_server[1], dify[1]))

    assert code == 0
    assert line(text, "WARN dify") == "WARN dify: this key belongs to a workflow app; use a chat app's key"


def test_kf_accounts_with_their_own_dify_app_are_checked_too(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    routes = (
        KfRouteSettings("wkSAMEAPP", "", DIFY_KEY),  # same app as the default: not checked twice
        KfRouteSettings("wkOTHER", "", "app-other-Key-321"),
    )
    settings = make_settings(wecom_server[1], dify[1], kf_routes=routes)

    code, text = check(settings)

    assert code == 1
    assert line(text, "OK   dify:")
    failure = line(text, "FAIL dify [KF:wkOTHER]")
    assert "DIFY_API_KEY is wrong" in failure
    assert "wkSAMEAPP" not in text
    assert "app-other-Key-321" not in text


# --- e. store ---------------------------------------------------------------------------------------


def test_a_reachable_memcached_passes(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    store = ScriptedStore(True)

    code, text = check(
        make_settings(wecom_server[1], dify[1], memcache=MEMCACHE), store_factory=lambda s: store
    )

    assert code == 0
    assert "memcached at 10.0.0.5:11211" in line(text, "OK   store")
    assert store.closed


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        (False, "does not answer"),
        (StoreUnavailable("connection refused"), "connection refused"),
        (None, "timed out"),
    ],
)
def test_an_unreachable_memcached_fails_with_how_to_start_it(
    answer: bool | BaseException | None,
    detail: str,
    wecom_server: tuple[FakeWeComServer, str],
    dify: tuple[FakeDifyServer, str],
) -> None:
    store = ScriptedStore(answer)

    code, text = check(
        make_settings(wecom_server[1], dify[1], memcache=MEMCACHE),
        store_factory=lambda s: store,
        timeout_s=0.3,
    )

    assert code == 1
    failure = line(text, "FAIL store")
    assert detail in failure
    assert (
        "hint: Memcached unreachable at 10.0.0.5:11211: start memcached (apt-get install memcached / "
        "systemctl start memcached) or fix [MEMCACHE] host/port" in failure
    )
    assert store.closed


def test_the_real_failover_store_reports_a_memcached_that_is_down(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    port = free_port()
    primaries: list[MemcachedStateStore] = []

    def store_factory(settings: Settings) -> FailoverStateStore:
        assert settings.memcache is not None
        primary = MemcachedStateStore(servers=settings.memcache.servers, connect_timeout=1, timeout=1)
        primaries.append(primary)
        return FailoverStateStore(primary, MemoryStateStore())

    settings = make_settings(
        wecom_server[1], dify[1], memcache=MemcacheSettings(servers=(("127.0.0.1", port),))
    )
    try:
        code, text = check(settings, store_factory=store_factory)
    finally:
        for primary in primaries:
            primary.close()

    assert code == 1
    assert f"Memcached unreachable at 127.0.0.1:{port}" in line(text, "FAIL store")


@pytest.mark.memcached
def test_a_real_memcached_passes(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    from tests.support.memcached import start_memcached

    server = start_memcached()
    try:
        settings = make_settings(
            wecom_server[1], dify[1], memcache=MemcacheSettings(servers=(("127.0.0.1", server.port),))
        )

        def store_factory(s: Settings) -> MemcachedStateStore:
            assert s.memcache is not None
            return MemcachedStateStore(servers=s.memcache.servers)

        code, text = check(settings, store_factory=store_factory)
    finally:
        server.kill()

    assert code == 0, text
    assert f"memcached at 127.0.0.1:{server.port}" in line(text, "OK   store")


# --- f. admin ---------------------------------------------------------------------------------------


def test_no_admin_token_is_a_warning_not_a_failure(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    code, text = check(make_settings(wecom_server[1], dify[1], admin_token=""))

    assert code == 0
    assert "admin endpoints refuse every request until ADMIN_TOKEN is set" in line(text, "WARN admin")
    assert "1 warning" in line(text, "summary")


@pytest.mark.parametrize(("token", "verdict"), [("x" * 23, "WARN admin"), ("x" * 24, "OK   admin")])
def test_an_admin_token_under_24_characters_is_a_warning(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str], token: str, verdict: str
) -> None:
    code, text = check(make_settings(wecom_server[1], dify[1], admin_token=token))

    assert code == 0
    row = line(text, verdict)
    assert ("under 24 characters" in row and "secrets.token_urlsafe" in row) == (verdict == "WARN admin")


# --- secrets ----------------------------------------------------------------------------------------


def test_secrets_never_appear_even_when_an_adapter_leaks_them(
    wecom_server: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str]
) -> None:
    class LeakyChannel(Closing):
        async def check_access(self) -> None:
            raise RuntimeError(f"boom with {CORP_SECRET} and {TOKEN}")

    code, text = check(make_settings(wecom_server[1], dify[1]), channel_factory=lambda s: LeakyChannel())

    assert code == 1
    assert "***" in line(text, "FAIL wecom")  # check() also asserts no secret value is in the output


@pytest.mark.parametrize(("found", "line"), [("/usr/bin/ffmpeg", "OK   voice"), (None, "WARN voice")])
def test_check_says_whether_voice_messages_can_be_converted(
    wecom: tuple[FakeWeComServer, str], dify: tuple[FakeDifyServer, str], found: str | None, line: str
) -> None:
    settings = make_settings(wecom[1], dify[1])
    out = io.StringIO()
    code = run_check(
        settings,
        [],
        channel_factory=real_channel,
        engine_factory=real_engine,
        store_factory=memory_store,
        out=out,
        voice_probe=lambda s: found,
    )
    assert code == 0
    assert any(row.startswith(line) for row in out.getvalue().splitlines())
