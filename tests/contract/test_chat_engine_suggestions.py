"""The `ChatEngine` contract for what progressive replies and suggestion menus need: the app's moderation and
"suggested questions after answer" switches, the suggested questions for an answer, and whether answers
stream. The fake and the real adapter over HTTP (against the local Dify server) behave the same."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest

from adapters.outbound.dify import DifyChatEngine
from adapters.outbound.fake_dify import FakeChatEngine
from application.errors import ChatEngineError
from application.ports import ChatEngine
from domain.chat import AppParameters, Question
from tests.support.dify_server import FakeDifyHost, FakeDifyServer
from tests.support.http_server import serve

pytestmark = pytest.mark.anyio
API_KEY = "app-suggest-key"
Suggest = Callable[[str, str], Sequence[str]]


def follow_ups(query: str, answer: str) -> list[str]:
    return [f"{query}要多久？", f"{query}怎么收费？", "还有别的办法吗？"]


@dataclass
class Side:
    engine: ChatEngine
    set_suggest: Callable[[Suggest | None], None]  # None: the feature is off
    set_moderation: Callable[[bool], None]


@pytest.fixture(scope="module")
def dify_host() -> Iterator[tuple[FakeDifyHost, str]]:
    host = FakeDifyHost()
    with serve(host) as url:
        yield host, url


@pytest.fixture(params=["fake", "emulated-streaming", "emulated-blocking"])
async def side(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[Side]:
    if request.param == "fake":
        fake = FakeChatEngine(responder=lambda q, h: f"答：{q.query}")
        fake.streaming = True

        def fake_suggest(suggest: Suggest | None) -> None:
            fake.suggestions = suggest
            fake.app_parameters = dataclasses.replace(
                fake.app_parameters, suggestions_after_answer=suggest is not None
            )

        def fake_moderation(on: bool) -> None:
            fake.app_parameters = dataclasses.replace(fake.app_parameters, moderation_enabled=on)

        yield Side(fake, fake_suggest, fake_moderation)
        return
    host, url = request.getfixturevalue("dify_host")
    host.server = server = FakeDifyServer(api_key=API_KEY)
    mode = request.param.removeprefix("emulated-")
    engine = DifyChatEngine(base_url=f"{url}/v1", api_key=API_KEY, response_mode=mode, total_timeout=10)

    def suggest(value: Suggest | None) -> None:
        server.suggest = value

    def moderation(on: bool) -> None:
        server.moderation = on

    try:
        yield Side(engine, suggest, moderation)
    finally:
        await engine.aclose()


async def test_the_parameters_tell_whether_moderation_and_suggestions_are_on(side: Side) -> None:
    assert (await side.engine.parameters()).moderation_enabled is False
    assert (await side.engine.parameters()).suggestions_after_answer is False
    side.set_moderation(True)
    side.set_suggest(follow_ups)

    parameters = await side.engine.parameters()

    assert (parameters.moderation_enabled, parameters.suggestions_after_answer) == (True, True)


async def test_the_questions_suggested_after_an_answer(side: Side) -> None:
    side.set_suggest(follow_ups)
    answer = await side.engine.ask(Question(user="wm-alice", query="修手机"))

    questions = await side.engine.suggested("wm-alice", answer.message_id)

    assert questions == ["修手机要多久？", "修手机怎么收费？", "还有别的办法吗？"]


async def test_suggestions_when_the_feature_is_off_are_an_error(side: Side) -> None:
    answer = await side.engine.ask(Question(user="wm-alice", query="修手机"))

    with pytest.raises(ChatEngineError) as caught:
        await side.engine.suggested("wm-alice", answer.message_id)
    assert caught.value.code == "bad_request"


async def test_suggestions_for_another_users_message_are_an_error(side: Side) -> None:
    side.set_suggest(follow_ups)
    answer = await side.engine.ask(Question(user="wm-alice", query="修手机"))

    with pytest.raises(ChatEngineError):
        await side.engine.suggested("wm-bob", answer.message_id)


def test_the_engine_says_whether_answers_stream(side: Side, request: pytest.FixtureRequest) -> None:
    assert side.engine.streams_answers is (not request.node.callspec.params["side"].endswith("blocking"))


def test_parameters_default_to_both_off() -> None:
    assert (AppParameters().moderation_enabled, AppParameters().suggestions_after_answer) == (False, False)
