"""The ChatEngine contract: every behaviour the use cases rely on, run against the fake and the adapter."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

import anyio
import pytest

from adapters.outbound.dify import DifyChatEngine
from adapters.outbound.fake_dify import FakeChatEngine
from application.errors import ChatEngineError, ConversationGone
from application.ports import ChatEngine
from domain.chat import Answer, AppInfo, AppParameters, Question
from tests.support.dify_server import FakeDifyHost, FakeDifyServer, Fault
from tests.support.http_server import serve

pytestmark = pytest.mark.anyio

API_KEY = "app-contract-key"
APP_NAME = "售后客服"
OPENING = "您好，请问有什么可以帮您？"
SUGGESTED = ("保修期多久？", "怎么退货？")
FILE_UPLOAD = {"image": {"enabled": True, "number_limits": 3, "transfer_methods": ["local_file"]}}
LIMITS = {"file_size_limit": 15, "image_file_size_limit": 10, "audio_file_size_limit": 50}

AnswerFunction = Callable[[str, Sequence[tuple[str, str]]], str]


@dataclass
class Harness:
    """The engine under test plus the levers a test pulls on whatever stands behind it."""

    engine: ChatEngine
    set_answer: Callable[[AnswerFunction], None]
    fail_next: Callable[[ChatEngineError], None]  # as Dify would report it: code, message, status
    forget: Callable[[str], None]  # Dify lost the conversation (deleted, upgrade, ...)


@pytest.fixture(scope="module")
def dify_host() -> Iterator[tuple[FakeDifyHost, str]]:
    host = FakeDifyHost()
    with serve(host) as url:
        yield host, url


def _fake_harness() -> Harness:
    fake = FakeChatEngine(
        app_info=AppInfo(name=APP_NAME, mode="chat"),
        app_parameters=AppParameters(
            opening_statement=OPENING,
            suggested_questions=SUGGESTED,
            speech_to_text=True,
            file_upload=FILE_UPLOAD,
            file_size_limit_mb=15,
            image_file_size_limit_mb=10,
            audio_file_size_limit_mb=50,
        ),
    )

    def set_answer(answer: AnswerFunction) -> None:
        fake.responder = lambda question, history: answer(question.query, history)

    return Harness(
        engine=fake, set_answer=set_answer, fail_next=fake.fail_next, forget=fake.forget_conversation
    )


def _emulated_harness(server: FakeDifyServer, engine: DifyChatEngine) -> Harness:
    def set_answer(answer: AnswerFunction) -> None:
        server.answer = answer

    def fail_next(error: ChatEngineError) -> None:
        body = {"code": error.code, "message": error.message, "status": error.status}
        server.inject(Fault(status=error.status or 500, body=body))

    return Harness(
        engine=engine, set_answer=set_answer, fail_next=fail_next, forget=server.delete_conversation
    )


@pytest.fixture(params=["fake", "emulated-streaming", "emulated-blocking"])
async def harness(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[Harness]:
    if request.param == "fake":
        yield _fake_harness()
        return
    host, url = request.getfixturevalue("dify_host")
    host.server = server = FakeDifyServer(
        api_key=API_KEY,
        mode="chat",
        app_name=APP_NAME,
        ping_interval=0.05,
        opening_statement=OPENING,
        suggested_questions=SUGGESTED,
        speech_to_text=True,
        file_upload=FILE_UPLOAD,
        system_parameters=LIMITS,
    )
    engine = DifyChatEngine(
        base_url=f"{url}/v1",
        api_key=API_KEY,
        response_mode=request.param.removeprefix("emulated-"),
        read_timeout=5,
        idle_timeout=5,
        total_timeout=10,
    )
    try:
        yield _emulated_harness(server, engine)
    finally:
        await engine.aclose()


def remember_everything(query: str, history: Sequence[tuple[str, str]]) -> str:
    return " | ".join([*(q for q, _ in history), query])


class TestChatEngineContract:
    async def test_first_ask_without_conversation_id_starts_a_new_conversation(
        self, harness: Harness
    ) -> None:
        answer = await harness.engine.ask(Question(user="wm-alice", query="你好"))

        assert answer.text == "答：你好"
        assert answer.conversation_id
        assert answer.message_id

    async def test_asking_with_the_returned_id_continues_that_conversation(self, harness: Harness) -> None:
        harness.set_answer(remember_everything)
        first = await harness.engine.ask(Question(user="wm-alice", query="我叫小明"))

        second = await harness.engine.ask(
            Question(user="wm-alice", query="我叫什么？", conversation_id=first.conversation_id)
        )

        assert second.conversation_id == first.conversation_id
        assert second.text == "我叫小明 | 我叫什么？"
        assert second.message_id != first.message_id

    async def test_each_new_conversation_gets_its_own_id_and_history(self, harness: Harness) -> None:
        harness.set_answer(remember_everything)

        one = await harness.engine.ask(Question(user="wm-alice", query="一"))
        two = await harness.engine.ask(Question(user="wm-alice", query="二"))

        assert one.conversation_id != two.conversation_id
        assert two.text == "二"

    async def test_an_empty_conversation_id_also_starts_a_new_conversation(self, harness: Harness) -> None:
        answer = await harness.engine.ask(Question(user="wm-alice", query="你好", conversation_id=""))

        assert answer.conversation_id

    @pytest.mark.parametrize("conversation_id", [str(uuid.uuid4()), "not-a-uuid"])
    async def test_an_unknown_or_malformed_conversation_id_is_gone(
        self, harness: Harness, conversation_id: str
    ) -> None:
        with pytest.raises(ConversationGone):
            await harness.engine.ask(
                Question(user="wm-alice", query="还在吗", conversation_id=conversation_id)
            )

    async def test_another_users_conversation_id_is_gone(self, harness: Harness) -> None:
        alices = await harness.engine.ask(Question(user="wm-alice", query="你好"))

        with pytest.raises(ConversationGone):
            await harness.engine.ask(
                Question(user="wm-bob", query="你好", conversation_id=alices.conversation_id)
            )

    async def test_a_conversation_dify_lost_is_gone(self, harness: Harness) -> None:
        first = await harness.engine.ask(Question(user="wm-alice", query="你好"))
        harness.forget(first.conversation_id)

        with pytest.raises(ConversationGone):
            await harness.engine.ask(
                Question(user="wm-alice", query="还在吗", conversation_id=first.conversation_id)
            )

    async def test_conversation_gone_is_a_chat_engine_error_that_a_plain_retry_cannot_fix(
        self, harness: Harness
    ) -> None:
        with pytest.raises(ChatEngineError) as caught:
            await harness.engine.ask(
                Question(user="wm-alice", query="你好", conversation_id=str(uuid.uuid4()))
            )

        assert isinstance(caught.value, ConversationGone)
        assert caught.value.code == "conversation_gone"
        assert caught.value.retryable is False

    async def test_after_conversation_gone_a_new_conversation_works(self, harness: Harness) -> None:
        harness.set_answer(remember_everything)
        with pytest.raises(ConversationGone):
            await harness.engine.ask(
                Question(user="wm-alice", query="旧的", conversation_id=str(uuid.uuid4()))
            )

        fresh = await harness.engine.ask(Question(user="wm-alice", query="新的"))

        assert fresh.text == "新的"
        assert fresh.conversation_id

    @pytest.mark.parametrize(
        ("status", "code", "retryable"),
        [
            (429, "too_many_requests", True),
            (429, "rate_limit_error", False),
            (400, "completion_request_error", True),
            (400, "provider_quota_exceeded", False),
            (400, "app_unavailable", False),
            (500, "internal_server_error", True),
        ],
    )
    async def test_a_failure_carries_difys_code_status_and_whether_a_retry_may_help(
        self, harness: Harness, status: int, code: str, retryable: bool
    ) -> None:
        harness.fail_next(ChatEngineError(code, "说明", status=status, retryable=retryable))

        with pytest.raises(ChatEngineError) as caught:
            await harness.engine.ask(Question(user="wm-alice", query="你好"))

        assert not isinstance(caught.value, ConversationGone)
        assert (caught.value.code, caught.value.status, caught.value.retryable) == (code, status, retryable)

    async def test_a_failed_ask_leaves_the_conversation_usable(self, harness: Harness) -> None:
        harness.set_answer(remember_everything)
        first = await harness.engine.ask(Question(user="wm-alice", query="一"))
        harness.fail_next(ChatEngineError("too_many_requests", "busy", status=429, retryable=True))
        with pytest.raises(ChatEngineError):
            await harness.engine.ask(
                Question(user="wm-alice", query="二", conversation_id=first.conversation_id)
            )

        again = await harness.engine.ask(
            Question(user="wm-alice", query="三", conversation_id=first.conversation_id)
        )

        assert again.text == "一 | 三"

    async def test_an_empty_query_is_refused_as_invalid_param(self, harness: Harness) -> None:
        with pytest.raises(ChatEngineError) as caught:
            await harness.engine.ask(Question(user="wm-alice", query=""))

        assert (caught.value.code, caught.value.retryable) == ("invalid_param", False)

    async def test_a_missing_user_is_refused_as_invalid_param(self, harness: Harness) -> None:
        with pytest.raises(ChatEngineError) as caught:
            await harness.engine.ask(Question(user="", query="你好"))

        assert (caught.value.code, caught.value.retryable) == ("invalid_param", False)

    async def test_cjk_emoji_and_newlines_round_trip(self, harness: Harness) -> None:
        query = "请问“保修期”多久？😊\n第二行\t制表符 \\ 反斜杠"

        answer = await harness.engine.ask(Question(user="wm-客户", query=query))

        assert answer.text == f"答：{query}"

    async def test_a_long_answer_arrives_whole(self, harness: Harness) -> None:
        harness.set_answer(lambda query, history: "".join(f"第{i}句。\n" for i in range(300)))

        answer = await harness.engine.ask(Question(user="wm-alice", query="说长一点"))

        assert answer.text == "".join(f"第{i}句。\n" for i in range(300))

    async def test_inputs_and_trace_id_do_not_change_the_answer(self, harness: Harness) -> None:
        answer = await harness.engine.ask(
            Question(user="wm-alice", query="你好", inputs={"channel": "wecom"}, trace_id="msg-1")
        )

        assert answer.text == "答：你好"

    async def test_concurrent_asks_for_different_users_do_not_mix(self, harness: Harness) -> None:
        answers: dict[str, Answer] = {}

        async def ask(user: str) -> None:
            answers[user] = await harness.engine.ask(Question(user=user, query=f"我是{user}"))

        async with anyio.create_task_group() as tg:
            for n in range(5):
                tg.start_soon(ask, f"wm-{n}")

        assert {user: a.text for user, a in answers.items()} == {
            f"wm-{n}": f"答：我是wm-{n}" for n in range(5)
        }
        assert len({a.conversation_id for a in answers.values()}) == 5

    async def test_info_names_the_app_and_its_mode(self, harness: Harness) -> None:
        info = await harness.engine.info()

        assert info == AppInfo(name=APP_NAME, mode="chat")
        assert info.streaming_only is False

    async def test_parameters_report_what_the_bot_uses(self, harness: Harness) -> None:
        parameters = await harness.engine.parameters()

        assert parameters == AppParameters(
            opening_statement=OPENING,
            suggested_questions=SUGGESTED,
            speech_to_text=True,
            file_upload=FILE_UPLOAD,
            file_size_limit_mb=15,
            image_file_size_limit_mb=10,
            audio_file_size_limit_mb=50,
        )
