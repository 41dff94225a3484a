"""The ChatEngine contract: every behaviour the use cases rely on, run against the fake and the adapter."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from adapters.outbound.audio import silent_wav
from adapters.outbound.dify import DifyChatEngine
from adapters.outbound.fake_dify import DEFAULT_TRANSCRIPT, FakeChatEngine
from application.errors import ChatEngineError, ConversationGone, MediaTooLarge
from application.ports import ChatEngine
from domain.chat import Answer, AppInfo, AppParameters, Attachment, Question
from tests.support import media_samples
from tests.support.dify_server import FakeDifyHost, FakeDifyServer, Fault
from tests.support.http_server import serve

pytestmark = pytest.mark.anyio

API_KEY = "app-contract-key"
APP_NAME = "售后客服"
OPENING = "您好，请问有什么可以帮您？"
SUGGESTED = ("保修期多久？", "怎么退货？")
FILE_UPLOAD = {"image": {"enabled": True, "number_limits": 3, "transfer_methods": ["local_file"]}}
# Small limits, so the too-large cases stay small on the wire.
LIMITS = {"file_size_limit": 2, "image_file_size_limit": 1, "audio_file_size_limit": 50}
DOCUMENTS = {
    "enabled": True,
    "allowed_file_types": ["document"],
    "allowed_file_upload_methods": ["local_file"],
    "number_limits": 3,
}
MB = 1024 * 1024

AnswerFunction = Callable[[str, Sequence[tuple[str, str]]], str]


@dataclass
class Harness:
    """The engine under test plus the levers a test pulls on whatever stands behind it."""

    engine: ChatEngine
    set_answer: Callable[[AnswerFunction], None]
    fail_next: Callable[[ChatEngineError], None]  # as Dify would report it: code, message, status
    forget: Callable[[str], None]  # Dify lost the conversation (deleted, upgrade, ...)
    set_file_upload: Callable[[Mapping[str, Any]], None]  # the app's File Upload settings
    set_speech_to_text: Callable[[bool], None]
    host: Callable[[bytes, str, str], str]  # (bytes, content type, extension) → URL an answer could name
    last_files: Callable[[], list[tuple[str, str]]]  # (type, upload_file_id) of the last question's files
    stored: Callable[[str], tuple[str, bytes]]  # upload_file_id → (user, bytes) as Dify keeps them
    set_mode: Callable[[str], None]  # the app's type: chat, agent-chat, advanced-chat, agent
    moderate_next: Callable[[str], None]  # output moderation replaces the next answer with this text
    pause_next: Callable[[str], None]  # the next run stops at a Human Input node with this title
    end: Callable[[str], None]  # the conversation is closed (Dify: status no longer "normal")
    # The next answer comes with what carries nothing for the customer: reasoning, speech, workflow progress,
    # pings, an event of a newer Dify (a stream's business: the fake has no stream, so nothing to add there).
    decorate_next: Callable[[], None]
    streams: bool = True  # False: Dify answers with one JSON body (blocking mode)


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
            file_size_limit_mb=2,
            image_file_size_limit_mb=1,
            audio_file_size_limit_mb=50,
        ),
    )

    def set_answer(answer: AnswerFunction) -> None:
        fake.responder = lambda question, history: answer(question.query, history)

    def set_file_upload(settings: Mapping[str, Any]) -> None:
        fake.app_parameters = dataclasses.replace(fake.app_parameters, file_upload=dict(settings))

    def set_speech_to_text(enabled: bool) -> None:
        fake.app_parameters = dataclasses.replace(fake.app_parameters, speech_to_text=enabled)

    def host(data: bytes, content_type: str, extension: str) -> str:
        return fake.host_file(
            f"https://dify.fake/files/tools/{uuid.uuid4()}.{extension}?sign=s", data, content_type
        )

    def last_files() -> list[tuple[str, str]]:
        return [(f.kind, f.upload_file_id) for f in fake.questions[-1].files]

    def stored(upload_file_id: str) -> tuple[str, bytes]:
        _, user, data = fake.uploads[upload_file_id]
        return user, data

    def set_mode(mode: str) -> None:
        fake.app_info = dataclasses.replace(fake.app_info, mode=mode)

    return Harness(
        engine=fake,
        set_answer=set_answer,
        fail_next=fake.fail_next,
        forget=fake.forget_conversation,
        set_file_upload=set_file_upload,
        set_speech_to_text=set_speech_to_text,
        host=host,
        last_files=last_files,
        stored=stored,
        set_mode=set_mode,
        moderate_next=fake.replace_next,
        pause_next=fake.pause_next,
        end=fake.end_conversation,
        decorate_next=lambda: None,
    )


def _emulated_harness(server: FakeDifyServer, engine: DifyChatEngine, url: str, *, streams: bool) -> Harness:
    def set_answer(answer: AnswerFunction) -> None:
        server.answer = answer

    def fail_next(error: ChatEngineError) -> None:
        body = {"code": error.code, "message": error.message, "status": error.status}
        headers = {"Retry-After": f"{error.retry_after_s:g}"} if error.retry_after_s is not None else None
        server.inject(Fault(status=error.status or 500, body=body, headers=headers))

    def set_mode(mode: str) -> None:
        server.mode = mode

    def pause_next(title: str) -> None:
        server.mode = "advanced-chat"  # Human Input nodes exist in chatflows only
        server.inject(Fault(workflow_paused=True, human_input_title=title))

    def decorate_next() -> None:
        server.inject(
            Fault(
                reasoning="先想一想。", tts=True, progress_events=True, unknown_event=True, pings_between=True
            )
        )

    def set_file_upload(settings: Mapping[str, Any]) -> None:
        server.file_upload = dict(settings)

    def set_speech_to_text(enabled: bool) -> None:
        server.speech_to_text = enabled

    def host(data: bytes, content_type: str, extension: str) -> str:
        return url + server.host_file(data, content_type, extension)

    def last_files() -> list[tuple[str, str]]:
        files = server.chat_requests()[-1].json.get("files") or []
        return [(f["type"], f["upload_file_id"]) for f in files]

    def stored(upload_file_id: str) -> tuple[str, bytes]:
        upload = server.uploads[upload_file_id]
        return upload.user, upload.data

    return Harness(
        engine=engine,
        set_answer=set_answer,
        fail_next=fail_next,
        forget=server.delete_conversation,
        set_file_upload=set_file_upload,
        set_speech_to_text=set_speech_to_text,
        host=host,
        last_files=last_files,
        stored=stored,
        set_mode=set_mode,
        moderate_next=lambda text: server.inject(Fault(replace_with=text)),
        pause_next=pause_next,
        end=server.end_conversation,
        decorate_next=decorate_next,
        streams=streams,
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
        yield _emulated_harness(server, engine, url, streams=request.param == "emulated-streaming")
    finally:
        await engine.aclose()


class RecordedProgress:
    """An AnswerProgress that writes down what it hears."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def accepted(self) -> None:
        self.events.append("accepted")

    def streamed(self, text: str) -> None:
        self.events.append(f"text:{text}")

    def texts(self) -> list[str]:
        return [event.removeprefix("text:") for event in self.events if event.startswith("text:")]


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
            (429, "rate_limit_error", True),
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

    @pytest.mark.parametrize(
        ("status", "code", "retry_after_s"),
        [(429, "too_many_requests", 2.0), (429, "rate_limit_error", 30.0), (503, "http_503", None)],
    )
    async def test_rate_limits_and_unavailability_are_retryable_with_their_retry_after(
        self, harness: Harness, status: int, code: str, retry_after_s: float | None
    ) -> None:
        harness.fail_next(
            ChatEngineError(code, "稍后再试", status=status, retryable=True, retry_after_s=retry_after_s)
        )

        with pytest.raises(ChatEngineError) as caught:
            await harness.engine.ask(Question(user="wm-alice", query="你好"))

        error = caught.value
        assert (error.code, error.status, error.retryable, error.retry_after_s) == (
            code,
            status,
            True,
            retry_after_s,
        )

    async def test_a_completed_conversation_is_gone(self, harness: Harness) -> None:
        first = await harness.engine.ask(Question(user="wm-alice", query="你好"))
        harness.end(first.conversation_id)

        with pytest.raises(ConversationGone):
            await harness.engine.ask(
                Question(user="wm-alice", query="还在吗", conversation_id=first.conversation_id)
            )
        fresh = await harness.engine.ask(Question(user="wm-alice", query="新的"))
        assert (fresh.text, fresh.conversation_id != first.conversation_id) == ("答：新的", True)

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

    @pytest.mark.parametrize("mode", ["chat", "agent-chat", "advanced-chat", "agent"])
    async def test_every_app_type_gives_the_whole_answer_once(self, harness: Harness, mode: str) -> None:
        # Agent apps refuse blocking mode: the blocking engine must ask again streaming, unnoticed.
        harness.set_mode(mode)
        harness.set_answer(lambda query, history: "您好！保修期为一年，详情见说明书。")

        answer = await harness.engine.ask(Question(user="wm-alice", query="保修期多久？"))
        again = await harness.engine.ask(
            Question(user="wm-alice", query="谢谢", conversation_id=answer.conversation_id)
        )

        assert (answer.text, again.text) == ("您好！保修期为一年，详情见说明书。",) * 2
        assert (answer.needs_human_input, again.conversation_id) == ("", answer.conversation_id)

    @pytest.mark.parametrize("mode", ["chat", "agent-chat", "advanced-chat", "agent"])
    async def test_moderations_replacement_is_the_answer(self, harness: Harness, mode: str) -> None:
        harness.set_mode(mode)
        harness.moderate_next("抱歉，这个问题我无法回答。")

        answer = await harness.engine.ask(Question(user="wm-alice", query="违规的问题"))

        assert answer.text == "抱歉，这个问题我无法回答。"

    @pytest.mark.parametrize("mode", ["chat", "agent-chat", "advanced-chat", "agent"])
    async def test_reasoning_speech_progress_and_unknown_events_leave_the_answer_alone(
        self, harness: Harness, mode: str
    ) -> None:
        harness.set_mode(mode)
        harness.decorate_next()

        answer = await harness.engine.ask(Question(user="wm-alice", query="你好"))

        assert (answer.text, answer.needs_human_input) == ("答：你好", "")

    async def test_a_pause_for_human_input_ends_the_turn_naming_the_node(self, harness: Harness) -> None:
        if not harness.streams and not isinstance(harness.engine, FakeChatEngine):
            pytest.skip("Dify documents the Human Input pause for streams only")
        harness.pause_next("退款审核")

        answer = await harness.engine.ask(Question(user="wm-alice", query="我要退款"))

        assert (answer.text, answer.needs_human_input) == ("", "退款审核")
        assert answer.conversation_id
        after = await harness.engine.ask(
            Question(user="wm-alice", query="还在吗", conversation_id=answer.conversation_id)
        )
        assert (after.text, after.needs_human_input) == ("答：还在吗", "")

    async def test_progress_hears_the_acceptance_then_the_text_as_it_grows(self, harness: Harness) -> None:
        progress = RecordedProgress()

        answer = await harness.engine.ask(Question(user="wm-alice", query="你好"), progress)

        assert progress.events[0] == "accepted"
        assert progress.events.count("accepted") == 1
        texts = progress.texts()
        assert texts and texts[-1] == answer.text == "答：你好"
        assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:], strict=False))

    async def test_progress_hears_nothing_when_the_app_refuses(self, harness: Harness) -> None:
        progress = RecordedProgress()

        with pytest.raises(ChatEngineError):
            await harness.engine.ask(Question(user="wm-alice", query=""), progress)

        assert progress.events == []

    @pytest.mark.parametrize("mode", ["chat", "agent"])
    async def test_progress_hears_moderations_replacement_last(self, harness: Harness, mode: str) -> None:
        harness.set_mode(mode)
        harness.moderate_next("已屏蔽")
        progress = RecordedProgress()

        answer = await harness.engine.ask(Question(user="wm-alice", query="说点什么"), progress)

        assert answer.text == "已屏蔽"
        assert progress.texts()[-1] == "已屏蔽"

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
            file_size_limit_mb=2,
            image_file_size_limit_mb=1,
            audio_file_size_limit_mb=50,
        )


class TestFilesContract:
    async def test_an_uploaded_image_belongs_to_the_user_and_can_be_asked_about(
        self, harness: Harness
    ) -> None:
        image = media_samples.png()

        uploaded = await harness.engine.upload_file("wm-alice", "photo.png", "image/png", image)
        answer = await harness.engine.ask(
            Question(user="wm-alice", query="这是什么？", files=(Attachment("image", uploaded.id),))
        )

        assert (uploaded.name, uploaded.size, uploaded.extension, uploaded.mime_type) == (
            "photo.png",
            len(image),
            "png",
            "image/png",
        )
        assert harness.stored(uploaded.id) == ("wm-alice", image)
        assert answer.text == "答：这是什么？"
        assert harness.last_files() == [("image", uploaded.id)]

    async def test_an_image_uploaded_by_another_user_is_refused(self, harness: Harness) -> None:
        uploaded = await harness.engine.upload_file("wm-alice", "photo.png", "image/png", media_samples.png())

        with pytest.raises(ChatEngineError) as caught:
            await harness.engine.ask(
                Question(user="wm-bob", query="看看", files=(Attachment("image", uploaded.id),))
            )
        assert (caught.value.code, caught.value.retryable) == ("invalid_param", False)

    async def test_an_unknown_upload_id_is_refused(self, harness: Harness) -> None:
        with pytest.raises(ChatEngineError) as caught:
            await harness.engine.ask(
                Question(user="wm-alice", query="看看", files=(Attachment("image", str(uuid.uuid4())),))
            )
        assert caught.value.code == "invalid_param"

    async def test_files_are_silently_ignored_when_the_app_takes_no_uploads(self, harness: Harness) -> None:
        harness.set_file_upload({})

        answer = await harness.engine.ask(
            Question(user="wm-alice", query="看看", files=(Attachment("image", str(uuid.uuid4())),))
        )

        assert answer.text == "答：看看"

    async def test_a_document_is_taken_when_the_app_allows_documents(self, harness: Harness) -> None:
        harness.set_file_upload(DOCUMENTS)
        document = media_samples.pdf()

        uploaded = await harness.engine.upload_file("wm-alice", "季度报告.pdf", "application/pdf", document)
        answer = await harness.engine.ask(
            Question(user="wm-alice", query="总结一下", files=(Attachment("document", uploaded.id),))
        )

        assert uploaded.name == "季度报告.pdf"
        assert harness.stored(uploaded.id) == ("wm-alice", document)
        assert answer.text == "答：总结一下"
        assert harness.last_files() == [("document", uploaded.id)]

    async def test_a_type_the_app_does_not_allow_is_refused(self, harness: Harness) -> None:
        harness.set_file_upload(DOCUMENTS)
        uploaded = await harness.engine.upload_file("wm-alice", "photo.png", "image/png", media_samples.png())

        with pytest.raises(ChatEngineError) as caught:
            await harness.engine.ask(
                Question(user="wm-alice", query="看看", files=(Attachment("image", uploaded.id),))
            )
        assert caught.value.code == "invalid_param"

    @pytest.mark.parametrize(
        ("name", "content_type", "size"),
        [("big.png", "image/png", 1 * MB + 1), ("big.pdf", "application/pdf", 2 * MB + 1)],
    )
    async def test_an_upload_over_the_apps_size_limit_is_file_too_large(
        self, harness: Harness, name: str, content_type: str, size: int
    ) -> None:
        data = media_samples.png(noise=size) if name.endswith(".png") else media_samples.pdf()
        data = data + b"\0" * max(0, size - len(data))

        with pytest.raises(ChatEngineError) as caught:
            await harness.engine.upload_file("wm-alice", name, content_type, data)
        assert (caught.value.code, caught.value.status) == ("file_too_large", 413)

    async def test_an_upload_without_a_content_type_is_refused_as_unsupported(self, harness: Harness) -> None:
        with pytest.raises(ChatEngineError) as caught:
            await harness.engine.upload_file("wm-alice", "photo.png", "", media_samples.png())
        assert (caught.value.code, caught.value.status) == ("unsupported_file_type", 415)

    async def test_a_file_name_with_a_path_is_refused(self, harness: Harness) -> None:
        with pytest.raises(ChatEngineError) as caught:
            await harness.engine.upload_file("wm-alice", "a/b.png", "image/png", media_samples.png())
        assert caught.value.code == "invalid_param"


class TestSpeechContract:
    @pytest.mark.parametrize("content_type", ["audio/wav", "audio/WAV"])
    async def test_wav_is_transcribed(self, harness: Harness, content_type: str) -> None:
        text = await harness.engine.transcribe("wm-alice", silent_wav(0.5), content_type)

        assert text == DEFAULT_TRANSCRIPT

    @pytest.mark.parametrize("content_type", ["audio/mpeg", "audio/x-wav", "application/octet-stream"])
    async def test_guessed_or_generic_part_types_are_refused(
        self, harness: Harness, content_type: str
    ) -> None:
        # What Python's mimetypes guesses for .mp3/.wav, and httpx's fallback: newer Dify refuses them all.
        with pytest.raises(ChatEngineError) as caught:
            await harness.engine.transcribe("wm-alice", silent_wav(0.5), content_type)
        assert (caught.value.code, caught.value.status) == ("unsupported_audio_type", 415)

    async def test_amr_passes_difys_gate_but_not_the_speech_model(self, harness: Harness) -> None:
        with pytest.raises(ChatEngineError) as caught:
            await harness.engine.transcribe("wm-alice", media_samples.synthetic_amr(), "audio/amr")
        assert caught.value.code == "completion_request_error"

    async def test_speech_to_text_off_is_refused(self, harness: Harness) -> None:
        harness.set_speech_to_text(False)

        with pytest.raises(ChatEngineError) as caught:
            await harness.engine.transcribe("wm-alice", silent_wav(0.5), "audio/wav")
        assert caught.value.code == "speech_to_text_disabled"


class TestFetchFileContract:
    async def test_an_answer_file_is_fetched_with_its_type(self, harness: Harness) -> None:
        image = media_samples.png()
        url = harness.host(image, "image/png", "png")

        blob = await harness.engine.fetch_file(url, max_bytes=1 * MB)

        assert blob.data == image
        assert blob.content_type.startswith("image/png")
        assert blob.filename.endswith(".png")

    async def test_a_file_over_max_bytes_is_media_too_large(self, harness: Harness) -> None:
        url = harness.host(media_samples.png(noise=20_000), "image/png", "png")

        with pytest.raises(MediaTooLarge):
            await harness.engine.fetch_file(url, max_bytes=10_000)

    async def test_a_missing_file_is_a_chat_engine_error(self, harness: Harness) -> None:
        url = harness.host(b"x", "text/plain", "txt").replace(".txt", "-gone.txt")

        with pytest.raises(ChatEngineError) as caught:
            await harness.engine.fetch_file(url, max_bytes=MB)
        assert caught.value.code == "http_404"
