"""DifyChatEngine against FakeDifyServer over real HTTP (and httpx.MockTransport for byte-level SSE cases)."""

from __future__ import annotations

import email.utils
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest

from adapters.outbound.dify import DifyChatEngine
from adapters.outbound.fake_dify import FakeChatEngine, FakeReply
from application.errors import ChatEngineError, ConversationGone
from domain.chat import AnswerFile, AppInfo, AppParameters, Attachment, Question
from tests.support.dify_server import FakeDifyHost, FakeDifyServer, Fault
from tests.support.http_server import free_port, serve

pytestmark = pytest.mark.anyio

KEY = "app-SeCrEt-KeY-0123456789"
QUESTION = Question(user="wm-alice", query="保修期多久？")
GATEWAY_PAGE = "<html><head><title>502 Bad Gateway</title></head><body><center>nginx</center></body></html>"

MakeEngine = Callable[..., DifyChatEngine]


@pytest.fixture(scope="module")
def dify_host() -> Iterator[tuple[FakeDifyHost, str]]:
    host = FakeDifyHost()
    with serve(host) as url:
        yield host, url


@pytest.fixture
def dify(dify_host: tuple[FakeDifyHost, str]) -> FakeDifyServer:
    host, _ = dify_host
    host.server = FakeDifyServer(api_key=KEY, ping_interval=0.05, hang_limit=5)
    return host.server


@pytest.fixture
async def make_engine(
    dify_host: tuple[FakeDifyHost, str], dify: FakeDifyServer, anyio_backend: str
) -> AsyncIterator[MakeEngine]:
    _, url = dify_host
    engines: list[DifyChatEngine] = []

    def make(**overrides: Any) -> DifyChatEngine:
        options: dict[str, Any] = {
            "base_url": f"{url}/v1",
            "api_key": KEY,
            "connect_timeout": 2,
            "read_timeout": 2,
            "idle_timeout": 2,
            "total_timeout": 5,
        }
        engine = DifyChatEngine(**(options | overrides))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.aclose()


def envelope(code: str, message: str, status: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    return body | {"status": status} if status is not None else body


async def ask_failing(engine: DifyChatEngine, question: Question = QUESTION) -> ChatEngineError:
    with pytest.raises(ChatEngineError) as caught:
        await engine.ask(question)
    return caught.value


async def new_conversation(engine: DifyChatEngine) -> str:
    return (await engine.ask(QUESTION)).conversation_id


# --- requests -------------------------------------------------------------------------------------------


class TestRequest:
    async def test_a_first_question_sends_only_what_dify_requires(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        await make_engine().ask(QUESTION)

        (request,) = dify.chat_requests()
        assert request.method == "POST"
        assert request.json == {
            "query": "保修期多久？",
            "inputs": {},
            "user": "wm-alice",
            "response_mode": "streaming",
        }
        assert request.headers["authorization"] == f"Bearer {KEY}"
        assert "x-trace-id" not in request.headers

    async def test_conversation_inputs_and_files_are_passed_on(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        engine = make_engine()
        conversation_id = await new_conversation(engine)
        file_id = str(uuid.uuid4())

        await engine.ask(
            Question(
                user="wm-alice",
                query="[图片]",
                conversation_id=conversation_id,
                inputs={"channel": "wecom", "vip": True},
                files=(Attachment(kind="image", upload_file_id=file_id),),
            )
        )

        body = dify.chat_requests()[-1].json
        assert body["conversation_id"] == conversation_id
        assert body["inputs"] == {"channel": "wecom", "vip": True}
        assert body["files"] == [
            {"type": "image", "transfer_method": "local_file", "upload_file_id": file_id}
        ]

    @pytest.mark.parametrize(
        ("trace_id", "sent"),
        [
            ("msg_123-abc", "msg_123-abc"),
            ("wm/123:msg.456 中文", "wm123msg456"),
            ("x" * 300, "x" * 128),
            ("/:. 中文", None),
        ],
    )
    async def test_the_trace_id_is_sanitised_into_x_trace_id(
        self, dify: FakeDifyServer, make_engine: MakeEngine, trace_id: str, sent: str | None
    ) -> None:
        await make_engine().ask(Question(user="wm-alice", query="你好", trace_id=trace_id))

        assert dify.chat_requests()[0].headers.get("x-trace-id") == sent

    @pytest.mark.parametrize("suffix", ["/v1", "/v1/"])
    async def test_base_url_works_with_or_without_trailing_slash(
        self, dify_host: tuple[FakeDifyHost, str], dify: FakeDifyServer, make_engine: MakeEngine, suffix: str
    ) -> None:
        _, url = dify_host
        engine = make_engine(base_url=url + suffix)

        assert (await engine.ask(QUESTION)).text == "答：保修期多久？"
        assert (await engine.info()).mode == "chat"
        assert {r.path for r in dify.requests} == {"/v1/chat-messages", "/v1/info"}

    def test_an_unknown_response_mode_is_refused_at_construction(self) -> None:
        with pytest.raises(ValueError):
            DifyChatEngine(base_url="http://dify.test/v1", api_key=KEY, response_mode="sse")


# --- streaming, per app type ----------------------------------------------------------------------------


class TestStreaming:
    @pytest.mark.parametrize("mode", ["chat", "agent-chat", "advanced-chat", "agent"])
    async def test_each_app_type_streams_the_whole_answer_once(
        self, dify: FakeDifyServer, make_engine: MakeEngine, mode: str
    ) -> None:
        dify.mode = mode
        dify.answer = lambda query, history: "您好！保修期为一年，\n详情见说明书。"

        answer = await make_engine().ask(QUESTION)

        # agent_thought (agent-chat), node events (advanced-chat) and the repeated closing message (agent)
        # must not leak into the text.
        assert answer.text == "您好！保修期为一年，\n详情见说明书。"
        assert answer.conversation_id == next(iter(dify.conversations))
        assert answer.message_id

    async def test_pings_between_chunks_are_skipped(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.chunk_delay = 0.12

        answer = await make_engine().ask(Question(user="wm-alice", query="一二三四五六七八"))

        assert answer.text == "答：一二三四五六七八"
        assert dify.pings_sent >= 2

    async def test_message_replace_replaces_everything_streamed_so_far(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.inject(Fault(replace_with="抱歉，这个问题我不能回答。"))

        answer = await make_engine().ask(QUESTION)

        assert answer.text == "抱歉，这个问题我不能回答。"

    async def test_reasoning_never_reaches_the_answer(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.mode = "advanced-chat"
        dify.inject(Fault(reasoning="用户问保修，我应该查一下说明书。"))

        answer = await make_engine().ask(QUESTION)

        assert answer.text == "答：保修期多久？"

    @pytest.mark.parametrize("mode", ["chat", "advanced-chat", "agent-chat", "agent"])
    async def test_tts_progress_pings_and_unknown_events_do_not_change_the_answer(
        self, dify: FakeDifyServer, make_engine: MakeEngine, mode: str
    ) -> None:
        dify.mode = mode
        dify.inject(Fault(tts=True, progress_events=True, unknown_event=True, pings_between=True))

        answer = await make_engine().ask(QUESTION)

        assert answer.text == "答：保修期多久？"
        assert answer.needs_human_input == ""

    @pytest.mark.parametrize("mode", ["agent", "agent-chat", "advanced-chat"])
    async def test_moderation_wins_in_every_app_type(
        self, dify: FakeDifyServer, make_engine: MakeEngine, mode: str
    ) -> None:
        dify.mode = mode
        dify.inject(Fault(replace_with="抱歉，这个问题我不能回答。"))

        answer = await make_engine().ask(QUESTION)

        assert answer.text == "抱歉，这个问题我不能回答。"

    @pytest.mark.parametrize("mode", ["chat", "agent-chat"])
    async def test_message_files_become_answer_files(
        self, dify_host: tuple[FakeDifyHost, str], dify: FakeDifyServer, make_engine: MakeEngine, mode: str
    ) -> None:
        _, url = dify_host
        dify.mode = mode
        dify.inject(
            Fault(files=(("image", "https://cdn.example/a.png"), ("document", "/files/tools/b.pdf?sign=x")))
        )

        answer = await make_engine().ask(QUESTION)

        assert answer.text == "答：保修期多久？"
        assert answer.files == (
            AnswerFile(kind="image", url="https://cdn.example/a.png"),
            AnswerFile(kind="document", url=f"{url}/files/tools/b.pdf?sign=x"),
        )

    async def test_a_chatflow_answer_is_returned_without_waiting_for_the_stream_to_close(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.mode = "advanced-chat"
        dify.inject(Fault(keep_open_after_end=True))  # Dify #21568

        # An engine that waited for the stream to close would wait out its idle timeout (60 s) here.
        with anyio.fail_after(30):
            answer = await make_engine(idle_timeout=60).ask(QUESTION)

        assert answer.text == "答：保修期多久？"
        # and the stream was closed, freeing Dify's concurrency slot (docs/dify.md §8.1)
        with anyio.fail_after(2):
            while dify.active_streams:
                await anyio.sleep(0.02)

    async def test_the_answer_is_remembered_by_dify_for_the_next_turn(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        answer = await make_engine().ask(QUESTION)

        assert dify.history(answer.conversation_id) == [("保修期多久？", "答：保修期多久？")]


# --- streaming failures ---------------------------------------------------------------------------------


class TestStreamFailures:
    @pytest.mark.parametrize(
        ("code", "status", "retryable"),
        [
            ("completion_request_error", 400, True),
            ("provider_quota_exceeded", 400, False),
            ("internal_server_error", 500, True),
        ],
    )
    async def test_an_error_event_mid_answer_is_classified_by_its_code(
        self, dify: FakeDifyServer, make_engine: MakeEngine, code: str, status: int, retryable: bool
    ) -> None:
        dify.inject(Fault(error_after=2, error_code=code, error_status=status, error_message="出错了"))

        error = await ask_failing(make_engine())

        assert (error.code, error.status, error.retryable, error.message) == (
            code,
            status,
            retryable,
            "出错了",
        )

    async def test_a_failed_chatflow_reports_the_error_event_that_follows(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.mode = "advanced-chat"
        dify.inject(
            Fault(workflow_failed=True, error_code="completion_request_error", error_message="LLM 超时")
        )

        error = await ask_failing(make_engine())

        assert (error.code, error.retryable) == ("completion_request_error", True)

    async def test_a_failed_chatflow_without_an_error_event_is_workflow_failed(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.mode = "advanced-chat"
        dify.inject(Fault(workflow_failed=True, error_after_workflow_failed=False, error_message="节点失败"))

        error = await ask_failing(make_engine())

        assert (error.code, error.message, error.retryable) == ("workflow_failed", "节点失败", False)

    async def test_a_paused_chatflow_ends_the_turn_naming_the_node(
        self, dify: FakeDifyServer, make_engine: MakeEngine, caplog: pytest.LogCaptureFixture
    ) -> None:
        dify.mode = "advanced-chat"
        dify.inject(Fault(workflow_paused=True, paused_after=1, human_input_title="退款审核"))

        answer = await make_engine().ask(QUESTION)

        assert answer.needs_human_input == "退款审核"
        assert answer.text == "答：保修"  # what the app said before the Human Input node
        assert answer.conversation_id == next(iter(dify.conversations))
        assert [r.levelname for r in caplog.records if "human input" in r.getMessage()] == ["WARNING"]
        assert "退款审核" in caplog.text

    async def test_a_workflow_paused_event_alone_also_ends_the_turn(self) -> None:
        paused = {
            "workflow_run_id": "r-1",
            "paused_nodes": ["approve_node"],
            "reasons": [],
            "status": "paused",
        }
        body = sse({"event": "workflow_paused", **COMMON, "workflow_run_id": "r-1", "data": paused})
        engine, client = mock_engine(stream_of(body))
        async with client:
            answer = await engine.ask(QUESTION)

        assert (answer.text, answer.needs_human_input) == ("", "approve_node")

    async def test_an_answer_that_did_not_pause_needs_no_human(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.mode = "advanced-chat"

        answer = await make_engine().ask(QUESTION)

        assert answer.needs_human_input == ""

    async def test_eof_before_message_end_is_stream_incomplete(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.inject(Fault(eof_after=1))

        error = await ask_failing(make_engine())

        assert (error.code, error.retryable) == ("stream_incomplete", True)

    async def test_a_ping_only_stream_trips_the_idle_guard(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.inject(Fault(pings_only=True))
        started = time.monotonic()

        error = await ask_failing(make_engine(idle_timeout=0.3))

        assert (error.code, error.retryable) == ("idle_timeout", True)
        assert not isinstance(error, ConversationGone)
        assert time.monotonic() - started >= 0.3  # not before the idle timeout
        assert dify.pings_sent >= 3  # pings kept arriving: they do not count as progress

    async def test_a_ping_only_stream_on_an_unknown_conversation_is_conversation_gone(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.hang_on_unknown_conversation = True  # Dify #38800

        error = await ask_failing(
            make_engine(idle_timeout=0.3),
            Question(user="wm-alice", query="你好", conversation_id=str(uuid.uuid4())),
        )

        assert isinstance(error, ConversationGone)

    async def test_a_stall_after_content_is_idle_timeout_even_with_a_conversation(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        engine = make_engine(idle_timeout=0.3)
        conversation_id = await new_conversation(engine)
        dify.inject(Fault(stall_after=1))

        error = await ask_failing(
            engine, Question(user="wm-alice", query="你好", conversation_id=conversation_id)
        )

        assert not isinstance(error, ConversationGone)
        assert error.code == "idle_timeout"

    async def test_a_slow_trickle_is_cut_by_the_total_timeout(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.chunk_size = 1
        dify.chunk_delay = 0.1
        started = time.monotonic()

        error = await ask_failing(make_engine(idle_timeout=1, total_timeout=0.5))

        # "timeout" (not an answer, not idle_timeout): the total timeout cut the trickle.
        assert (error.code, error.retryable) == ("timeout", True)
        assert time.monotonic() - started >= 0.5

    async def test_no_response_headers_within_the_read_timeout_is_timeout(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.inject(Fault(delay=0.6))

        error = await ask_failing(make_engine(idle_timeout=0.2))

        assert (error.code, error.retryable) == ("timeout", True)


# --- HTTP errors ----------------------------------------------------------------------------------------


class TestHttpErrors:
    @pytest.mark.parametrize(
        "suffix", ["", " You have requested this URI [/v1/chat-messages] but did you mean …"]
    )
    async def test_an_unknown_conversation_is_gone(
        self, dify: FakeDifyServer, make_engine: MakeEngine, suffix: str
    ) -> None:
        dify.not_found_suffix = suffix

        error = await ask_failing(
            make_engine(), Question(user="wm-alice", query="你好", conversation_id=str(uuid.uuid4()))
        )

        assert isinstance(error, ConversationGone)
        assert error.status == 404
        assert error.message == "Conversation Not Exists." + suffix

    async def test_an_ended_conversation_is_gone(self, dify: FakeDifyServer, make_engine: MakeEngine) -> None:
        engine = make_engine()
        conversation_id = await new_conversation(engine)
        dify.end_conversation(conversation_id)

        error = await ask_failing(
            engine, Question(user="wm-alice", query="你好", conversation_id=conversation_id)
        )

        assert isinstance(error, ConversationGone)
        assert error.status == 400

    async def test_a_malformed_conversation_id_is_gone(self, make_engine: MakeEngine) -> None:
        error = await ask_failing(
            make_engine(), Question(user="wm-alice", query="你好", conversation_id="abc")
        )

        assert isinstance(error, ConversationGone)

    @pytest.mark.parametrize("with_conversation", [True, False])
    async def test_a_bad_file_id_is_not_mistaken_for_a_bad_conversation(
        self, dify: FakeDifyServer, make_engine: MakeEngine, with_conversation: bool
    ) -> None:
        engine = make_engine()
        conversation_id = await new_conversation(engine) if with_conversation else None
        message = "files.0.upload_file_id: Input should be a valid UUID"
        dify.inject(Fault(status=400, body={"code": "invalid_param", "message": message, "status": 400}))

        error = await ask_failing(
            engine, Question(user="wm-alice", query="你好", conversation_id=conversation_id)
        )

        assert not isinstance(error, ConversationGone)
        assert (error.code, error.retryable) == ("invalid_param", False)

    @pytest.mark.parametrize(
        ("status", "body", "code", "retryable"),
        [
            (429, envelope("too_many_requests", "Too many requests.", 429), "too_many_requests", True),
            (429, envelope("rate_limit_error", "Rate Limit Error", 429), "rate_limit_error", True),
            (400, envelope("completion_request_error", "Read timed out."), "completion_request_error", True),
            (400, envelope("app_unavailable", "App unavailable"), "app_unavailable", False),
            (500, {"message": "Internal Server Error", "code": "unknown"}, "unknown", True),
            (503, envelope("internal_server_error", "x", 503), "internal_server_error", True),
            (403, envelope("forbidden", "The app's API service has been disabled."), "forbidden", False),
            (400, {"message": "old parser error", "params": "query"}, "http_400", False),
            (502, GATEWAY_PAGE, "http_502", True),
            (504, "<html>Gateway Time-out</html>", "http_504", True),
            (524, "", "http_524", True),
            (413, "<html>413 Request Entity Too Large</html>", "http_413", False),
            (429, "<html>slow down</html>", "http_429", True),
        ],
    )  # fmt: skip
    async def test_error_responses_are_classified(
        self,
        dify: FakeDifyServer,
        make_engine: MakeEngine,
        status: int,
        body: Any,
        code: str,
        retryable: bool,
    ) -> None:
        dify.inject(Fault(status=status, body=body))

        error = await ask_failing(make_engine())

        assert (error.code, error.status, error.retryable) == (code, status, retryable)
        assert not isinstance(error, ConversationGone)

    @pytest.mark.parametrize(
        ("status", "code", "header", "seconds"),
        [
            (429, "too_many_requests", "7", 7.0),
            (429, "rate_limit_error", "1.5", 1.5),
            (503, "internal_server_error", "120", 120.0),
            (429, "too_many_requests", None, None),
            (429, "too_many_requests", "soon", None),
            (429, "too_many_requests", "-5", 0.0),
            (429, "too_many_requests", "99999999", 3600.0),
            (429, "too_many_requests", "Thu, 01 Jan 1970 00:00:00 GMT", 0.0),
        ],
    )
    async def test_rate_limits_and_unavailability_are_retryable_with_their_retry_after(
        self,
        dify: FakeDifyServer,
        make_engine: MakeEngine,
        status: int,
        code: str,
        header: str | None,
        seconds: float | None,
    ) -> None:
        headers = {"Retry-After": header} if header is not None else None
        dify.inject(Fault(status=status, body=envelope(code, "Too many requests.", status), headers=headers))

        error = await ask_failing(make_engine())

        assert (error.code, error.status, error.retryable, error.retry_after_s) == (
            code,
            status,
            True,
            seconds,
        )

    async def test_a_retry_after_as_a_future_http_date_is_seconds_from_now(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        when = email.utils.formatdate(time.time() + 600, usegmt=True)
        dify.inject(
            Fault(status=429, body=envelope("too_many_requests", "busy", 429), headers={"Retry-After": when})
        )

        error = await ask_failing(make_engine())

        assert error.retry_after_s is not None and 590 <= error.retry_after_s <= 600

    async def test_retry_after_is_read_on_the_other_endpoints_too(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.inject(
            Fault(
                path="/v1/parameters",
                status=429,
                body=envelope("too_many_requests", "busy", 429),
                headers={"Retry-After": "3"},
            )
        )

        with pytest.raises(ChatEngineError) as caught:
            await make_engine().parameters()

        assert (caught.value.retryable, caught.value.retry_after_s) == (True, 3.0)

    async def test_a_completed_conversation_is_gone(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        engine = make_engine()
        first = await engine.ask(QUESTION)
        dify.end_conversation(first.conversation_id)

        with pytest.raises(ConversationGone):
            await engine.ask(Question(user="wm-alice", query="再问", conversation_id=first.conversation_id))

    async def test_an_upload_too_large_with_an_empty_message_keeps_its_code(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.system_parameters = {**dify.system_parameters, "image_file_size_limit": 1}

        with pytest.raises(ChatEngineError) as caught:
            await make_engine().upload_file(
                "wm-alice", "big.png", "image/png", b"\x89PNG" + b"\0" * (1024 * 1024)
            )

        assert (caught.value.code, caught.value.status, caught.value.retryable) == (
            "file_too_large",
            413,
            False,
        )

    async def test_a_bad_key_is_unauthorized_and_not_retryable(self, make_engine: MakeEngine) -> None:
        error = await ask_failing(make_engine(api_key="app-wrong"))

        assert (error.code, error.status, error.retryable) == ("unauthorized", 401, False)

    async def test_the_api_key_never_appears_in_an_error(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.inject(
            Fault(status=400, body={"code": "invalid_param", "message": f"bad token {KEY} in request"})
        )

        error = await ask_failing(make_engine())

        for text in (str(error), repr(error), error.message):
            assert KEY not in text

    async def test_a_gateway_error_page_is_not_copied_into_the_message(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.inject(Fault(status=502, body=GATEWAY_PAGE))

        error = await ask_failing(make_engine())

        assert error.message == "HTTP 502 Bad Gateway"


# --- blocking -------------------------------------------------------------------------------------------


class TestBlocking:
    @pytest.mark.parametrize("mode", ["chat", "advanced-chat"])
    async def test_blocking_returns_the_json_answer(
        self, dify: FakeDifyServer, make_engine: MakeEngine, mode: str
    ) -> None:
        dify.mode = mode
        engine = make_engine(response_mode="blocking")

        first = await engine.ask(QUESTION)
        second = await engine.ask(
            Question(user="wm-alice", query="再问", conversation_id=first.conversation_id)
        )

        assert (first.text, second.text) == ("答：保修期多久？", "答：再问")
        assert second.conversation_id == first.conversation_id
        assert first.message_id
        assert dify.chat_requests()[0].json["response_mode"] == "blocking"

    async def test_a_blocking_request_answered_with_sse_is_parsed_as_a_stream(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.mode = "advanced-chat"
        dify.inject(Fault(sse_for_blocking=True))  # Dify 1.13.0, #32351

        answer = await make_engine(response_mode="blocking").ask(QUESTION)

        assert answer.text == "答：保修期多久？"

    @pytest.mark.parametrize(("mode", "code"), [("agent-chat", "invalid_param"), ("agent", "bad_request")])
    async def test_an_app_that_only_streams_is_asked_again_streaming_and_remembered(
        self,
        dify: FakeDifyServer,
        make_engine: MakeEngine,
        mode: str,
        code: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        dify.mode = mode
        engine = make_engine(response_mode="blocking")

        first = await engine.ask(QUESTION)
        second = await engine.ask(
            Question(user="wm-alice", query="再问", conversation_id=first.conversation_id)
        )

        assert (first.text, second.text) == ("答：保修期多久？", "答：再问")
        assert [r.json["response_mode"] for r in dify.chat_requests()] == [
            "blocking",
            "streaming",
            "streaming",
        ]
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1
        assert "DIFY_RESPONSE_MODE" in warnings[0].getMessage() and code in warnings[0].getMessage()

    @pytest.mark.parametrize(("mode", "code"), [("agent-chat", "invalid_param"), ("agent", "bad_request")])
    async def test_concurrent_refusals_warn_once(
        self,
        dify: FakeDifyServer,
        make_engine: MakeEngine,
        mode: str,
        code: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        dify.mode = mode
        engine = make_engine(response_mode="blocking")
        answers: list[str] = []

        async def ask(n: int) -> None:
            answers.append((await engine.ask(Question(user=f"wm-{n}", query="你好"))).text)

        async with anyio.create_task_group() as tg:
            for n in range(3):
                tg.start_soon(ask, n)

        assert answers == ["答：你好"] * 3
        assert len([r for r in caplog.records if "DIFY_RESPONSE_MODE" in r.getMessage()]) == 1

    async def test_other_blocking_failures_are_not_retried_streaming(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.inject(Fault(status=400, body=envelope("invalid_param", "Agent App has no bound Agent", 400)))

        error = await ask_failing(make_engine(response_mode="blocking"))

        assert (error.code, error.status) == ("invalid_param", 400)
        assert len(dify.chat_requests()) == 1

    async def test_a_model_failure_in_blocking_mode_is_an_http_error(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.inject(Fault(error_after=0))

        error = await ask_failing(make_engine(response_mode="blocking"))

        assert (error.code, error.status, error.retryable) == ("completion_request_error", 400, True)

    async def test_a_2xx_that_is_not_json_is_bad_response(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.inject(Fault(status=200, body="<html>captive portal</html>", content_type="application/json"))

        error = await ask_failing(make_engine(response_mode="blocking"))

        assert (error.code, error.status) == ("bad_response", 200)

    async def test_a_slow_blocking_answer_hits_the_read_timeout(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.inject(Fault(delay=0.6))

        error = await ask_failing(make_engine(response_mode="blocking", read_timeout=0.2))

        assert (error.code, error.retryable) == ("timeout", True)


# --- app info and parameters ----------------------------------------------------------------------------


class TestAppInfo:
    async def test_info_and_parameters_from_the_server(
        self, dify: FakeDifyServer, make_engine: MakeEngine
    ) -> None:
        dify.mode = "agent-chat"
        dify.app_name = "售后"
        dify.opening_statement = None
        dify.suggested_questions = ("怎么退货？",)
        dify.file_upload = {"enabled": True, "allowed_file_types": ["image"], "number_limits": 3}
        engine = make_engine()

        info = await engine.info()
        parameters = await engine.parameters()

        assert info == AppInfo(name="售后", mode="agent-chat")
        assert info.streaming_only
        assert parameters == AppParameters(
            opening_statement="",
            suggested_questions=("怎么退货？",),
            speech_to_text=False,
            file_upload={"enabled": True, "allowed_file_types": ["image"], "number_limits": 3},
            file_size_limit_mb=15,
            image_file_size_limit_mb=10,
            audio_file_size_limit_mb=50,
        )

    async def test_old_and_sparse_shapes_fall_back_to_defaults(self) -> None:
        bodies = {
            "/v1/info": {"name": "旧版", "description": ""},
            "/v1/parameters": {
                "opening_statement": None,
                "suggested_questions": None,
                "file_upload": None,
                "system_parameters": {"image_file_size_limit": "10"},
            },
        }
        engine, client = mock_engine(lambda request: httpx.Response(200, json=bodies[request.url.path]))
        async with client:
            assert await engine.info() == AppInfo(name="旧版", mode="")
            assert await engine.parameters() == AppParameters(image_file_size_limit_mb=10)

    @pytest.mark.parametrize("call", ["info", "parameters"])
    async def test_info_and_parameters_errors_are_chat_engine_errors(
        self, dify: FakeDifyServer, make_engine: MakeEngine, call: str
    ) -> None:
        dify.inject(Fault(path=f"/v1/{call}", status=502, body=GATEWAY_PAGE))
        engine = make_engine()

        with pytest.raises(ChatEngineError) as caught:
            await getattr(engine, call)()

        assert (caught.value.code, caught.value.retryable) == ("http_502", True)

    async def test_info_with_a_bad_key_is_unauthorized(self, make_engine: MakeEngine) -> None:
        with pytest.raises(ChatEngineError) as caught:
            await make_engine(api_key="app-wrong").info()

        assert (caught.value.code, caught.value.status) == ("unauthorized", 401)


# --- transport ------------------------------------------------------------------------------------------


class TestTransport:
    @pytest.mark.parametrize("call", ["ask", "info"])
    async def test_a_closed_port_is_unreachable(self, anyio_backend: str, call: str) -> None:
        engine = DifyChatEngine(base_url=f"http://127.0.0.1:{free_port()}/v1", api_key=KEY, connect_timeout=1)
        try:
            with pytest.raises(ChatEngineError) as caught:
                await (engine.ask(QUESTION) if call == "ask" else engine.info())
        finally:
            await engine.aclose()

        assert (caught.value.code, caught.value.retryable) == ("unreachable", True)
        assert KEY not in str(caught.value)

    async def test_a_connection_dropped_mid_stream_is_stream_incomplete(self) -> None:
        class Broken(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                yield sse({"event": "message", "conversation_id": "c-1", "answer": "半"})
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )

        engine, client = mock_engine(
            lambda request: httpx.Response(
                200, headers={"content-type": "text/event-stream"}, stream=Broken()
            )
        )
        async with client:
            error = await ask_failing(engine)

        assert (error.code, error.retryable) == ("stream_incomplete", True)

    async def test_an_injected_client_is_left_open_and_an_own_client_is_closed(
        self, anyio_backend: str
    ) -> None:
        async with httpx.AsyncClient() as client:
            borrowed = DifyChatEngine(base_url="http://dify.test/v1", api_key=KEY, client=client)
            owned = DifyChatEngine(base_url="http://dify.test/v1", api_key=KEY)

            await borrowed.aclose()
            await owned.aclose()

            assert not client.is_closed
            assert owned._client.is_closed


# --- SSE parsing at the byte level ----------------------------------------------------------------------


def sse(event: dict[str, Any], *, prefix: str = "data: ", ensure_ascii: bool = False) -> bytes:
    return f"{prefix}{json.dumps(event, ensure_ascii=ensure_ascii)}\n\n".encode()


def mock_engine(
    handler: Callable[[httpx.Request], httpx.Response], **options: Any
) -> tuple[DifyChatEngine, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    engine = DifyChatEngine(base_url="http://dify.test/v1", api_key=KEY, client=client, **options)
    return engine, client


def stream_of(*parts: bytes) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(
        200, headers={"content-type": "text/event-stream; charset=utf-8"}, content=b"".join(parts)
    )


COMMON = {"conversation_id": "c-1", "message_id": "m-1", "task_id": "t-1", "created_at": 1}


class TestSseParsing:
    async def test_tolerates_missing_space_crlf_comments_unknown_events_and_escaped_json(self) -> None:
        body = (
            b": a comment\r\n\r\n"
            + b"event: ping\r\n\r\n"
            + b"retry: 1000\n\n"
            + sse({"event": "message", **COMMON, "answer": "你"}, prefix="data:").replace(b"\n", b"\r\n")
            + b"event: message\n"
            + sse({"event": "message", **COMMON, "answer": "好"}, ensure_ascii=True)
            + sse({"event": "brand_new_event_2027", **COMMON, "stuff": [1, 2]})
            + sse({"event": "reasoning_chunk", **COMMON, "data": {"reasoning": "让我想想"}})
            + sse({"event": "tts_message", **COMMON, "audio": "AAAA"})
            + sse({"event": "message", **COMMON, "answer": "！"})
            + sse({"event": "message_end", **COMMON, "id": "m-1", "metadata": {}})
            + sse({"event": "message", **COMMON, "answer": "after the end"})
        )
        engine, client = mock_engine(stream_of(body))
        async with client:
            answer = await engine.ask(QUESTION)

        assert (answer.text, answer.conversation_id, answer.message_id) == ("你好！", "c-1", "m-1")

    async def test_an_agent_annotation_reply_as_message_is_kept(self) -> None:
        body = (
            sse({"event": "agent_thought", **COMMON, "id": "th-1", "position": 1, "thought": "想法"})
            + sse({"event": "agent_message", **COMMON, "id": "m-1", "answer": "第一段。"})
            + sse({"event": "message", **COMMON, "id": "m-1", "answer": "补充。"})
            + sse({"event": "message_end", **COMMON, "id": "m-1"})
        )
        engine, client = mock_engine(stream_of(body))
        async with client:
            answer = await engine.ask(QUESTION)

        assert answer.text == "第一段。补充。"

    @pytest.mark.parametrize(
        ("final", "expected"),
        [
            ("第一段。第二段。", "第一段。第二段。"),  # the closing message repeats the answer
            ("第一段。第二段。\n", "第一段。第二段。"),  # ... with other whitespace: the streamed text stays
            ("\n第一段。第二段。", "第一段。第二段。"),  # ... with leading whitespace
            ("第一段。第二段。第三段。", "第一段。第二段。第三段。"),  # ... and more than was streamed
        ],
    )
    async def test_the_new_agents_closing_message_is_not_appended(self, final: str, expected: str) -> None:
        body = (
            sse({"event": "agent_message", **COMMON, "id": "m-1", "answer": "第一段。"})
            + sse({"event": "agent_thought", **COMMON, "id": "th-1", "position": 1, "thought": "想法"})
            + sse({"event": "agent_message", **COMMON, "id": "m-1", "answer": "第二段。"})
            + sse({"event": "message", **COMMON, "id": "m-1", "answer": final})
            + sse({"event": "message_end", **COMMON, "id": "m-1"})
        )
        engine, client = mock_engine(stream_of(body))
        async with client:
            answer = await engine.ask(QUESTION)

        assert answer.text == expected

    async def test_nothing_streamed_after_a_replacement_counts(self) -> None:
        body = (
            sse({"event": "agent_message", **COMMON, "answer": "违规内容"})
            + sse({"event": "message_replace", **COMMON, "answer": "已屏蔽"})
            + sse({"event": "message", **COMMON, "answer": "违规内容"})
            + sse({"event": "agent_message", **COMMON, "answer": "更多"})
            + sse({"event": "message_end", **COMMON})
        )
        engine, client = mock_engine(stream_of(body))
        async with client:
            answer = await engine.ask(QUESTION)

        assert answer.text == "已屏蔽"

    async def test_an_error_event_carries_its_status_and_code(self) -> None:
        body = sse({"event": "message", **COMMON, "answer": "好"}) + sse(
            {
                "event": "error",
                **COMMON,
                "status": 429,
                "code": "rate_limit_error",
                "message": "Rate Limit Error",
            }
        )
        engine, client = mock_engine(stream_of(body))
        async with client:
            error = await ask_failing(engine)

        assert (error.code, error.status, error.retryable) == ("rate_limit_error", 429, True)

    async def test_a_user_file_event_is_not_an_answer_file(self) -> None:
        body = (
            sse(
                {
                    "event": "message_file",
                    **COMMON,
                    "id": "f-1",
                    "type": "image",
                    "belongs_to": "user",
                    "url": "/u",
                }
            )
            + sse({"event": "message", **COMMON, "answer": "好"})
            + sse({"event": "message_end", **COMMON})
        )
        engine, client = mock_engine(stream_of(body))
        async with client:
            answer = await engine.ask(QUESTION)

        assert answer.files == ()

    async def test_an_event_that_is_not_json_is_bad_response(self) -> None:
        engine, client = mock_engine(stream_of(b"data: {not json\n\n"))
        async with client:
            error = await ask_failing(engine)

        assert error.code == "bad_response"

    async def test_events_only_pythons_json_reads_are_still_read(self) -> None:
        # A split emoji's escaped half, NaN and an integer past 64 bits: the fast parser refuses all three.
        odd = b'{"event": "message", "answer": "\\ud83d\xe5\xa5\xbd", "score": NaN, '
        odd += b'"n": 123456789012345678901234567890'
        body = (
            b"data: "
            + odd
            + b', "conversation_id": "c-1", "message_id": "m-1"}\n\n'
            + sse({"event": "message_end", **COMMON})
        )
        engine, client = mock_engine(stream_of(body))
        async with client:
            answer = await engine.ask(QUESTION)

        assert answer.text == "\ud83d好"

    async def test_a_stream_without_conversation_id_is_bad_response(self) -> None:
        body = sse({"event": "message", "answer": "好"}) + sse({"event": "message_end"})
        engine, client = mock_engine(stream_of(body))
        async with client:
            error = await ask_failing(engine)

        assert error.code == "bad_response"

    async def test_a_json_body_to_a_streaming_request_is_read_as_blocking(self) -> None:
        engine, client = mock_engine(
            lambda request: httpx.Response(200, json={"answer": "好", "conversation_id": "c-9", "id": "m-9"})
        )
        async with client:
            answer = await engine.ask(QUESTION)

        assert (answer.text, answer.conversation_id, answer.message_id) == ("好", "c-9", "m-9")


# --- the fake's own knobs (its behaviour as a ChatEngine is pinned by the contract suite) ----------------


class TestFakeChatEngine:
    async def test_records_questions_and_fails_the_next_n_asks(self, anyio_backend: str) -> None:
        fake = FakeChatEngine()
        busy = ChatEngineError("too_many_requests", status=429, retryable=True)
        fake.fail_next(busy, times=2)

        for _ in range(2):
            with pytest.raises(ChatEngineError) as caught:
                await fake.ask(QUESTION)
            assert caught.value is busy
        answer = await fake.ask(QUESTION)

        assert answer.text == "答：保修期多久？"
        assert fake.questions == [QUESTION] * 3
        assert fake.conversation_ids("wm-alice") == [answer.conversation_id]

    async def test_async_responders_files_and_history(self, anyio_backend: str) -> None:
        async def responder(question: Question, history: Any) -> FakeReply:
            await anyio.sleep(0)
            return FakeReply(f"{len(history)}", files=(AnswerFile(kind="image", url="https://x/a.png"),))

        fake = FakeChatEngine(responder=responder)
        first = await fake.ask(QUESTION)
        second = await fake.ask(
            Question(user="wm-alice", query="再问", conversation_id=first.conversation_id)
        )

        assert (first.text, second.text) == ("0", "1")
        assert second.files == (AnswerFile(kind="image", url="https://x/a.png"),)
        assert fake.history(first.conversation_id) == [("保修期多久？", "0"), ("再问", "1")]

    async def test_delay_makes_asks_slow(self, anyio_backend: str) -> None:
        fake = FakeChatEngine(delay=0.2)

        with anyio.move_on_after(0.05) as scope:
            await fake.ask(QUESTION)

        assert scope.cancelled_caught


class TestSseLines:
    """The stream reader's line splitting, on bodies cut into chunks at awkward places."""

    @staticmethod
    async def lines_of(*chunks: bytes) -> list[bytes]:
        from adapters.outbound.dify_stream import sse_lines as _sse_lines

        async def body() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        response = httpx.Response(200, content=body())
        return [line async for batch in _sse_lines(response) for line in batch]

    @pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
    async def test_every_sse_line_ending_splits_lines(self, ending: bytes, anyio_backend: str) -> None:
        body = ending.join([b"event: ping", b"", b'data: {"a": 1}', b"", b'data: {"b": "\xe4\xbd\xa0"}', b""])
        for cut in range(1, len(body)):  # the body in two chunks, cut everywhere
            assert await self.lines_of(body[:cut], body[cut:]) == [
                b'data: {"a": 1}',
                b'data: {"b": "\xe4\xbd\xa0"}',
            ]

    async def test_a_last_line_without_newline_still_counts(self, anyio_backend: str) -> None:
        assert await self.lines_of(b'data: {"a"', b": 1}") == [b'data: {"a": 1}']
