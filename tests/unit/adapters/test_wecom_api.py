"""WeComKfChannel specifics the contract suite does not cover: the token cache, retries, transport failures,
secrets kept out of errors and logs, and request/response shapes (docs/wecom-kf.md)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest

from adapters.outbound.wecom_api import WeComKfChannel
from application.errors import WeComError
from application.ports import ServiceState
from domain.messages import CustomerRef
from tests.support.http_server import free_port, serve
from tests.support.wecom_server import FakeWeComServer

pytestmark = pytest.mark.anyio

KF = "wkKF000001"
ALICE = CustomerRef(KF, "wmALICE0001")
BASE = "http://wecom.test"


class ManualClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    """The adapter's (monotonic) clock."""
    return ManualClock()


@pytest.fixture
def server() -> FakeWeComServer:
    server = FakeWeComServer()
    server.world.add_customer_text(KF, ALICE.external_userid, "hi")
    server.world.add_servicer("zhangsan")
    return server


@pytest.fixture
async def client(server: FakeWeComServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app)) as client:
        yield client


@pytest.fixture
def make_channel(
    server: FakeWeComServer, client: httpx.AsyncClient, clock: ManualClock
) -> Callable[..., WeComKfChannel]:
    def make(**overrides: Any) -> WeComKfChannel:
        options: dict[str, Any] = {
            "corp_id": server.corp_id,
            "corp_secret": server.corp_secret,
            "api_base": BASE,
            "client": client,
            "clock": clock,
        }
        options.update(overrides)
        return WeComKfChannel(**options)

    return make


@pytest.fixture
def channel(make_channel: Callable[..., WeComKfChannel]) -> WeComKfChannel:
    return make_channel()  # the shared client is closed by its fixture


class TestAccessToken:
    async def test_one_gettoken_serves_many_calls_and_goes_in_the_query_string(
        self, channel: WeComKfChannel, server: FakeWeComServer
    ) -> None:
        await channel.get_service_state(ALICE)
        await channel.sync_messages(KF, cursor=None, token=None)
        await channel.send_text(ALICE, "hello", msgid="r1")

        assert server.gettoken_calls == 1
        (token,) = server.issued_tokens
        kf_calls = [c for c in server.calls if c.api != "gettoken"]
        assert len(kf_calls) == 3
        assert all(c.access_token == token and "access_token" not in (c.body or {}) for c in kf_calls)

    async def test_concurrent_first_calls_share_one_gettoken(
        self, channel: WeComKfChannel, server: FakeWeComServer
    ) -> None:
        server.delay_next("gettoken", 0.05)
        states: list[ServiceState] = []

        async def ask() -> None:
            states.append(await channel.get_service_state(ALICE))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(ask)

        assert states == [ServiceState(0)] * 10
        assert server.gettoken_calls == 1

    async def test_the_token_is_refreshed_shortly_before_it_expires(
        self, channel: WeComKfChannel, server: FakeWeComServer, clock: ManualClock
    ) -> None:
        await channel.get_service_state(ALICE)
        clock.advance(7200 - 300 - 1)
        await channel.get_service_state(ALICE)
        assert server.gettoken_calls == 1

        clock.advance(2)
        await channel.get_service_state(ALICE)
        assert server.gettoken_calls == 2

    async def test_a_short_lifetime_keeps_at_least_half_of_it(
        self, channel: WeComKfChannel, server: FakeWeComServer, clock: ManualClock
    ) -> None:
        server.expires_in = 400  # 400 - 300 would leave only 100 s
        await channel.get_service_state(ALICE)
        clock.advance(199)
        await channel.get_service_state(ALICE)
        assert server.gettoken_calls == 1
        clock.advance(2)
        await channel.get_service_state(ALICE)
        assert server.gettoken_calls == 2

    @pytest.mark.parametrize("errcode", [40014, 42001])
    async def test_a_rejected_token_is_refreshed_once_and_the_call_retried_once(
        self, channel: WeComKfChannel, server: FakeWeComServer, errcode: int
    ) -> None:
        await channel.get_service_state(ALICE)
        server.revoke_tokens(errcode)

        assert await channel.send_text(ALICE, "hello", msgid="r1") == "r1"

        assert server.gettoken_calls == 2
        assert [c.errcode for c in server.calls_to("kf/send_msg")] == [errcode, 0]
        assert server.calls_to("kf/send_msg")[1].access_token == server.issued_tokens[1]

    async def test_a_token_that_the_server_expired_early_is_replaced(
        self, channel: WeComKfChannel, server: FakeWeComServer
    ) -> None:
        await channel.get_service_state(ALICE)
        server.world.clock = lambda: 10**12  # WeCom's clock is past the token's expiry; ours is not

        await channel.get_service_state(ALICE)

        assert [c.errcode for c in server.calls_to("kf/service_state/get")] == [0, 42001, 0]

    @pytest.mark.parametrize("errcode", [40014, 42001])
    async def test_a_second_token_failure_surfaces_without_looping(
        self, channel: WeComKfChannel, server: FakeWeComServer, errcode: int
    ) -> None:
        server.world.fail_next("kf/send_msg", errcode, times=5)

        with pytest.raises(WeComError) as caught:
            await channel.send_text(ALICE, "hello", msgid="r1")

        assert caught.value.errcode == errcode and caught.value.api == "kf/send_msg"
        assert server.gettoken_calls == 2
        assert len(server.calls_to("kf/send_msg")) == 2

    async def test_other_errcodes_are_not_retried(
        self, channel: WeComKfChannel, server: FakeWeComServer
    ) -> None:
        server.world.fail_next("kf/send_msg", -1)
        with pytest.raises(WeComError) as caught:
            await channel.send_text(ALICE, "hello", msgid="r1")
        assert caught.value.errcode == -1 and caught.value.is_transient
        assert len(server.calls_to("kf/send_msg")) == 1 and server.gettoken_calls == 1

    async def test_check_access_fetches_a_fresh_token(
        self, channel: WeComKfChannel, server: FakeWeComServer
    ) -> None:
        await channel.check_access()
        await channel.check_access()
        await channel.get_service_state(ALICE)
        assert server.gettoken_calls == 2
        assert server.calls_to("kf/service_state/get")[0].access_token == server.issued_tokens[1]


class TestConfigErrors:
    @pytest.mark.parametrize(
        ("overrides", "errcode"),
        [
            ({"corp_secret": "wrong-secret"}, 40001),
            ({"corp_id": "wwSOMEONEELSE"}, 40013),
            ({"corp_secret": ""}, 41004),
        ],
    )
    async def test_bad_credentials_raise_at_once_and_are_not_retried(
        self,
        make_channel: Callable[..., WeComKfChannel],
        server: FakeWeComServer,
        overrides: dict[str, str],
        errcode: int,
    ) -> None:
        channel = make_channel(**overrides)

        for _ in range(3):
            with pytest.raises(WeComError) as caught:
                await channel.send_text(ALICE, "hello", msgid="r1")
            assert caught.value.errcode == errcode and caught.value.is_config_error

        assert server.gettoken_calls == 1  # the rest were answered from memory
        assert server.calls_to("kf/send_msg") == []

    async def test_an_untrusted_ip_is_remembered_for_a_while_then_asked_again(
        self, channel: WeComKfChannel, server: FakeWeComServer, clock: ManualClock
    ) -> None:
        server.world.fail_next("gettoken", 60020)
        with pytest.raises(WeComError) as caught:
            await channel.check_access()
        assert caught.value.errcode == 60020

        clock.advance(29)
        with pytest.raises(WeComError) as caught:
            await channel.get_service_state(ALICE)
        assert caught.value.errcode == 60020 and server.gettoken_calls == 1

        clock.advance(2)
        assert await channel.get_service_state(ALICE) == ServiceState(0)
        assert server.gettoken_calls == 2

    async def test_concurrent_callers_after_a_config_error_share_it(
        self, make_channel: Callable[..., WeComKfChannel], server: FakeWeComServer
    ) -> None:
        channel = make_channel(corp_secret="wrong-secret")
        errors: list[int | None] = []

        async def ask() -> None:
            try:
                await channel.get_service_state(ALICE)
            except WeComError as exc:
                errors.append(exc.errcode)

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(ask)

        assert errors == [40001] * 5 and server.gettoken_calls == 1

    async def test_a_busy_gettoken_is_not_remembered(
        self, channel: WeComKfChannel, server: FakeWeComServer
    ) -> None:
        server.world.fail_next("gettoken", -1)
        with pytest.raises(WeComError) as caught:
            await channel.get_service_state(ALICE)
        assert caught.value.errcode == -1
        assert await channel.get_service_state(ALICE) == ServiceState(0)
        assert server.gettoken_calls == 2


class TestTransportFailures:
    @pytest.mark.parametrize("api", ["gettoken", "kf/service_state/get"])
    async def test_an_html_error_page_is_a_transient_error(
        self, channel: WeComKfChannel, server: FakeWeComServer, api: str
    ) -> None:
        server.fail_next_http(api, 502)
        with pytest.raises(WeComError) as caught:
            await channel.get_service_state(ALICE)
        assert caught.value.errcode is None and caught.value.is_transient
        assert "HTTP 502" in str(caught.value)

    async def test_html_with_status_200_is_a_transient_error(
        self, channel: WeComKfChannel, server: FakeWeComServer
    ) -> None:
        server.respond_html_next("kf/sync_msg")
        with pytest.raises(WeComError) as caught:
            await channel.sync_messages(KF, cursor=None, token=None)
        assert caught.value.errcode is None and "non-JSON" in str(caught.value)

    async def test_connection_refused(self) -> None:
        channel = WeComKfChannel(
            corp_id="wwc", corp_secret="s3cr3t-value", api_base=f"http://127.0.0.1:{free_port()}", timeout=2
        )
        try:
            with pytest.raises(WeComError) as caught:
                await channel.get_service_state(ALICE)
        finally:
            await channel.aclose()
        assert caught.value.errcode is None
        assert str(caught.value) == "WeCom errcode None (gettoken): gettoken unreachable: ConnectError"
        assert caught.value.__cause__ is None and caught.value.__context__ is None

    async def test_a_slow_answer_times_out(self, server: FakeWeComServer) -> None:
        server.delay_next("kf/service_state/get", 0.5)
        with serve(server.app) as base_url:
            async with WeComKfChannel(
                corp_id=server.corp_id, corp_secret=server.corp_secret, api_base=base_url, timeout=0.1
            ) as channel:
                with pytest.raises(WeComError) as caught:
                    await channel.get_service_state(ALICE)
        assert caught.value.errcode is None and "ReadTimeout" in str(caught.value)

    async def test_a_given_client_is_left_open(
        self, channel: WeComKfChannel, client: httpx.AsyncClient
    ) -> None:
        await channel.aclose()
        assert not client.is_closed


class TestSecrets:
    async def test_neither_secret_nor_token_reach_errors_or_logs(
        self, channel: WeComKfChannel, server: FakeWeComServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        await channel.get_service_state(ALICE)
        (token,) = server.issued_tokens
        server.world.fail_next("kf/send_msg", 40058, errmsg=f"invalid parameter near access_token={token}")
        server.fail_next_http("kf/service_state/get", 500)

        failures: list[WeComError] = []
        for call in (channel.send_text(ALICE, "x", msgid="r1"), channel.get_service_state(ALICE)):
            with pytest.raises(WeComError) as caught:
                await call
            failures.append(caught.value)

        assert [f.errcode for f in failures] == [40058, None]
        for text in [str(f) for f in failures] + [repr(f) for f in failures] + [caplog.text]:
            assert token not in text and server.corp_secret not in text
        assert "access_token=***" in caplog.text and "corpsecret=***" in caplog.text

    async def test_an_unreachable_api_keeps_the_token_out(self) -> None:
        token = "tok-never-show-me-123"

        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/gettoken"):
                return httpx.Response(200, json={"errcode": 0, "access_token": token, "expires_in": 7200})
            raise httpx.ConnectError(f"cannot reach {request.url}", request=request)

        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            channel = WeComKfChannel(corp_id="c", corp_secret="s3cr3t-value", api_base=BASE, client=client)
            with pytest.raises(WeComError) as caught:
                await channel.get_service_state(ALICE)
        assert caught.value.errcode is None and "ConnectError" in str(caught.value)
        assert token not in str(caught.value) and caught.value.__context__ is None


class TestRequestShapes:
    async def test_sync_sends_cursor_and_token_only_when_given(
        self, channel: WeComKfChannel, server: FakeWeComServer
    ) -> None:
        first = await channel.sync_messages(KF, cursor=None, token="")
        await channel.sync_messages(
            KF, cursor=first.next_cursor, token="ENCApHxnGDNAVNY4AaSJKj4Tb5m", limit=10
        )

        bodies = [c.body for c in server.calls_to("kf/sync_msg")]
        assert bodies == [
            {"limit": 1000, "voice_format": 0, "open_kfid": KF},
            {
                "limit": 10,
                "voice_format": 0,
                "open_kfid": KF,
                "cursor": first.next_cursor,
                "token": "ENCApHxnGDNAVNY4AaSJKj4Tb5m",
            },
        ]
        assert server.sync_calls == 2 and server.sync_tokens == [None, "ENCApHxnGDNAVNY4AaSJKj4Tb5m"]

    async def test_send_text_body(self, channel: WeComKfChannel, server: FakeWeComServer) -> None:
        await channel.send_text(ALICE, "你好", msgid="r1")
        assert server.calls_to("kf/send_msg")[0].body == {
            "touser": ALICE.external_userid,
            "open_kfid": KF,
            "msgtype": "text",
            "text": {"content": "你好"},
            "msgid": "r1",
        }

    async def test_transfer_names_the_servicer_only_when_given(
        self, channel: WeComKfChannel, server: FakeWeComServer
    ) -> None:
        await channel.transfer_service_state(ALICE, state=1)
        code = await channel.transfer_service_state(ALICE, state=3, servicer_userid="zhangsan")

        bodies = [c.body for c in server.calls_to("kf/service_state/trans")]
        assert bodies == [
            {"open_kfid": KF, "external_userid": ALICE.external_userid, "service_state": 1},
            {
                "open_kfid": KF,
                "external_userid": ALICE.external_userid,
                "service_state": 3,
                "servicer_userid": "zhangsan",
            },
        ]
        assert code and await channel.get_service_state(ALICE) == ServiceState(3, "zhangsan")

    async def test_send_on_event_text_and_menu_bodies(
        self, channel: WeComKfChannel, server: FakeWeComServer
    ) -> None:
        _, first = server.world.add_enter_session(KF, ALICE.external_userid)
        _, second = server.world.add_enter_session(KF, ALICE.external_userid)
        await channel.send_on_event(first, "欢迎", msgid="w1")
        await channel.send_on_event(second, "请选择", msgid="w2", menu=[("human", "转人工")])

        bodies = [c.body for c in server.calls_to("kf/send_msg_on_event")]
        assert bodies == [
            {"code": first, "msgid": "w1", "msgtype": "text", "text": {"content": "欢迎"}},
            {
                "code": second,
                "msgid": "w2",
                "msgtype": "msgmenu",
                "msgmenu": {
                    "head_content": "请选择",
                    "list": [{"type": "click", "click": {"id": "human", "content": "转人工"}}],
                },
            },
        ]

    async def test_api_base_with_a_trailing_slash(
        self, make_channel: Callable[..., WeComKfChannel], server: FakeWeComServer
    ) -> None:
        channel = make_channel(api_base=BASE + "/")
        assert await channel.get_service_state(ALICE) == ServiceState(0)


def scripted(answers: dict[str, Any]) -> httpx.MockTransport:
    """A WeCom that answers each path with a fixed JSON body (a list: one per call)."""

    def handler(request: httpx.Request) -> httpx.Response:
        api = request.url.path.removeprefix("/cgi-bin/")
        if api == "gettoken":
            return httpx.Response(200, json={"errcode": 0, "access_token": "T", "expires_in": "7200"})
        answer = answers[api]
        if isinstance(answer, list):
            answer = answer.pop(0)
        return httpx.Response(
            200, content=json.dumps(answer).encode(), headers={"content-type": "text/plain"}
        )

    return httpx.MockTransport(handler)


@pytest.fixture
async def scripted_channel(request: pytest.FixtureRequest) -> AsyncIterator[WeComKfChannel]:
    async with httpx.AsyncClient(transport=scripted(request.param)) as client:
        yield WeComKfChannel(corp_id="c", corp_secret="s", api_base=BASE, client=client)


class TestOddAnswers:
    @pytest.mark.parametrize(
        "scripted_channel",
        [
            {
                "kf/sync_msg": {
                    "errcode": "0",
                    "has_more": "1",
                    "msg_list": [
                        {"msgtype": "text"},
                        {"msgid": "m1", "msgtype": "text", "text": {"content": "hi"}},
                    ],
                }
            }
        ],
        indirect=True,
    )
    async def test_sync_skips_unidentifiable_items_and_keeps_the_cursor(
        self, scripted_channel: WeComKfChannel
    ) -> None:
        page = await scripted_channel.sync_messages(KF, cursor="C1", token=None)
        assert [m.msgid for m in page.messages] == ["m1"]
        assert page.has_more is True
        assert (
            page.next_cursor == "C1"
        )  # no next_cursor in the answer: never send the caller back to the start

    @pytest.mark.parametrize(
        "scripted_channel",
        [{"kf/sync_msg": {"errcode": 0, "msg_list": None, "next_cursor": "C2"}}],
        indirect=True,
    )
    async def test_sync_with_a_null_list(self, scripted_channel: WeComKfChannel) -> None:
        page = await scripted_channel.sync_messages(KF, cursor=None, token=None)
        assert (page.messages, page.next_cursor, page.has_more) == ((), "C2", False)

    @pytest.mark.parametrize(
        "scripted_channel",
        [
            {
                "kf/service_state/get": [
                    {"errcode": "42001"},
                    {"errcode": 0, "service_state": "3", "servicer_userid": "zs"},
                ]
            }
        ],
        indirect=True,
    )
    async def test_errcodes_and_states_as_strings(self, scripted_channel: WeComKfChannel) -> None:
        assert await scripted_channel.get_service_state(ALICE) == ServiceState(3, "zs")

    @pytest.mark.parametrize("scripted_channel", [{"kf/service_state/get": {"errcode": 0}}], indirect=True)
    async def test_a_state_answer_without_a_state(self, scripted_channel: WeComKfChannel) -> None:
        with pytest.raises(WeComError) as caught:
            await scripted_channel.get_service_state(ALICE)
        assert caught.value.errcode is None

    @pytest.mark.parametrize("scripted_channel", [{"kf/send_msg": {"errcode": 0}}], indirect=True)
    async def test_send_without_a_msgid_in_the_answer_returns_ours(
        self, scripted_channel: WeComKfChannel
    ) -> None:
        assert await scripted_channel.send_text(ALICE, "x", msgid="mine") == "mine"

    @pytest.mark.parametrize("scripted_channel", [{"kf/sync_msg": [["not", "an", "object"]]}], indirect=True)
    async def test_json_that_is_not_an_object(self, scripted_channel: WeComKfChannel) -> None:
        with pytest.raises(WeComError) as caught:
            await scripted_channel.sync_messages(KF, cursor=None, token=None)
        assert caught.value.errcode is None


class TestOutsideText:
    async def test_control_characters_in_errmsg_are_escaped(
        self, channel: WeComKfChannel, server: FakeWeComServer
    ) -> None:
        server.world.fail_next("kf/send_msg", 40058, errmsg="bad\r\nFAKE LOG line\x1b[31m\u2028x")

        with pytest.raises(WeComError) as caught:
            await channel.send_text(ALICE, "x", msgid="r1")

        assert caught.value.errcode == 40058
        for text in (caught.value.errmsg, str(caught.value)):
            assert text.isprintable()
            assert "bad\\r\\nFAKE LOG line\\x1b[31m\\u2028x" in text

    async def test_a_long_errmsg_is_cut(self, channel: WeComKfChannel, server: FakeWeComServer) -> None:
        server.world.fail_next("kf/send_msg", 40058, errmsg="y" * 10_000)

        with pytest.raises(WeComError) as caught:
            await channel.send_text(ALICE, "x", msgid="r1")

        assert len(caught.value.errmsg) < 1_000

    async def test_a_json_error_without_disposition_is_an_error_whatever_its_shape(
        self, channel: WeComKfChannel, server: FakeWeComServer
    ) -> None:
        _, media_id = server.world.add_customer_media(KF, ALICE.external_userid, "file", b"%PDF-1.4", "x/y")
        server.fail_next_http("media/get", 200, body="[1, 2]", content_type="application/json")

        with pytest.raises(WeComError) as caught:
            await channel.download_media(media_id, max_bytes=1024)

        assert caught.value.errcode is None and "without the media" in caught.value.errmsg
