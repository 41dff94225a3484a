"""The ChatEngine contract for what issue #17 adds: the app's declared input variables (and Dify's checks of
the inputs against them), message feedback and conversation names, on the fake and on Dify over HTTP."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from adapters.outbound.dify import DifyChatEngine
from adapters.outbound.fake_dify import FakeChatEngine, RecordedFeedback
from application.errors import ChatEngineError
from application.ports import ChatEngine
from domain.app_form import FormField, parse_input_form
from domain.chat import AppParameters, Question
from tests.contract.test_dify_conformance import request_problems
from tests.support.dify_server import FakeDifyHost, FakeDifyServer
from tests.support.http_server import serve

pytestmark = pytest.mark.anyio

API_KEY = "app-context-key"
FORM: list[dict[str, Any]] = [
    {"text-input": {"variable": "nickname", "label": "昵称", "required": False, "max_length": 8}},
    {"paragraph": {"variable": "scene_param", "label": "来源", "required": False}},
    {"select": {"variable": "gender", "label": "性别", "required": False, "options": ["男", "女", "未知"]}},
    {"text-input": {"variable": "order_no", "label": "订单号", "required": True, "max_length": 20}},
]


@dataclass
class Harness:
    engine: ChatEngine
    set_form: Callable[[list[dict[str, Any]]], None]
    feedbacks: Callable[[], Sequence[RecordedFeedback]]
    names: Callable[[], dict[str, str]]
    server: FakeDifyServer | None = None


@pytest.fixture(scope="module")
def dify_host() -> Iterator[tuple[FakeDifyHost, str]]:
    host = FakeDifyHost()
    with serve(host) as url:
        yield host, url


@pytest.fixture(params=["fake", "dify"])
async def harness(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[Harness]:
    if request.param == "fake":
        fake = FakeChatEngine()

        def set_fake_form(form: list[dict[str, Any]]) -> None:
            fake.app_parameters = dataclasses.replace(AppParameters(), input_form=parse_input_form(form))

        yield Harness(fake, set_fake_form, lambda: fake.feedbacks, lambda: fake.conversation_names)
        return
    host, url = request.getfixturevalue("dify_host")
    server = FakeDifyServer(api_key=API_KEY)
    host.server = server
    engine = DifyChatEngine(base_url=f"{url}/v1", api_key=API_KEY)

    def set_form(form: list[dict[str, Any]]) -> None:
        server.user_input_form = form

    try:
        yield Harness(engine, set_form, lambda: server.feedbacks, lambda: server.conversation_names, server)
    finally:
        await engine.aclose()
        assert [(r.path, request_problems(r)) for r in server.requests if request_problems(r)] == []
        assert server.schema_violations == []


class TestInputForm:
    async def test_the_declared_variables_come_with_the_parameters(self, harness: Harness) -> None:
        harness.set_form(FORM)

        form = (await harness.engine.parameters()).input_form

        assert [f.variable for f in form] == ["nickname", "scene_param", "gender", "order_no"]
        assert form[0] == FormField("nickname", "text-input", label="昵称", max_length=8)
        assert form[2].options == ("男", "女", "未知")
        assert form[3].required

    async def test_an_app_without_variables_declares_none(self, harness: Harness) -> None:
        assert (await harness.engine.parameters()).input_form == ()

    async def test_fitting_inputs_are_taken(self, harness: Harness) -> None:
        harness.set_form(FORM)
        inputs = {"nickname": "张三", "gender": "女", "order_no": "A1", "undeclared": "ignored"}

        answer = await harness.engine.ask(Question(user="wm-a", query="你好", inputs=inputs))

        assert answer.text

    @pytest.mark.parametrize(
        "inputs",
        [
            {"nickname": "张三"},  # the required order_no is missing
            {"order_no": "A1", "gender": "其他"},  # outside the select's options
            {"order_no": "A1", "nickname": "一二三四五六七八九"},  # longer than max_length 8
        ],
        ids=["required-missing", "select-outside-options", "text-too-long"],
    )
    async def test_inputs_the_form_refuses_are_refused(
        self, harness: Harness, inputs: dict[str, str]
    ) -> None:
        harness.set_form(FORM)

        with pytest.raises(ChatEngineError) as refused:
            await harness.engine.ask(Question(user="wm-a", query="你好", inputs=inputs))

        assert refused.value.status == 400


class TestFeedback:
    async def test_feedback_on_an_answer_is_recorded(self, harness: Harness) -> None:
        answer = await harness.engine.ask(Question(user="wm-a", query="保修多久？"))

        await harness.engine.give_feedback(
            answer.message_id, user="wm-a", rating="dislike", content="客户随后要求转人工：人工"
        )

        assert list(harness.feedbacks()) == [
            RecordedFeedback(answer.message_id, "wm-a", "dislike", "客户随后要求转人工：人工")
        ]

    async def test_feedback_on_another_users_or_an_unknown_answer_is_refused(self, harness: Harness) -> None:
        answer = await harness.engine.ask(Question(user="wm-a", query="保修多久？"))

        for message_id, user in (
            (answer.message_id, "wm-b"),
            ("00000000-0000-0000-0000-000000000000", "wm-a"),
        ):
            with pytest.raises(ChatEngineError):
                await harness.engine.give_feedback(message_id, user=user, rating="dislike", content="x")
        assert list(harness.feedbacks()) == []


class TestConversationName:
    async def test_a_conversation_is_named(self, harness: Harness) -> None:
        answer = await harness.engine.ask(Question(user="wm-a", query="你好"))

        await harness.engine.name_conversation(answer.conversation_id, user="wm-a", name="微信客户 张三")

        assert harness.names() == {answer.conversation_id: "微信客户 张三"}

    async def test_another_users_conversation_is_not_named(self, harness: Harness) -> None:
        answer = await harness.engine.ask(Question(user="wm-a", query="你好"))

        with pytest.raises(ChatEngineError):
            await harness.engine.name_conversation(answer.conversation_id, user="wm-b", name="x")
        assert harness.names() == {}
