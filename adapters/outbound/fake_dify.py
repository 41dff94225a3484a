"""FakeChatEngine: an honest in-memory ChatEngine for unit tests (passes the ChatEngine contract suite)."""

from __future__ import annotations

import inspect
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import anyio

from application.errors import ChatEngineError, ConversationGone
from domain.chat import Answer, AnswerFile, AppInfo, AppParameters, Question

Turn = tuple[str, str]  # (query, answer), oldest first


@dataclass(frozen=True, slots=True)
class FakeReply:
    """What a responder may return instead of plain text, to attach files to the answer."""

    text: str
    files: tuple[AnswerFile, ...] = ()


Responder = Callable[[Question, Sequence[Turn]], str | FakeReply | Awaitable[str | FakeReply]]


def echo(question: Question, history: Sequence[Turn]) -> str:
    return f"答：{question.query}"


@dataclass
class FakeConversation:
    id: str
    user: str
    turns: list[Turn] = field(default_factory=list)


class FakeChatEngine:
    """Keeps conversations per user like Dify (spec §0 #4); answers through a programmable responder."""

    def __init__(
        self,
        *,
        responder: Responder = echo,
        app_info: AppInfo | None = None,
        app_parameters: AppParameters | None = None,
        delay: float = 0.0,
    ) -> None:
        self.responder = responder
        self.app_info = app_info or AppInfo(name="Fake Dify app", mode="chat")
        self.app_parameters = app_parameters or AppParameters()
        self.delay = delay
        self.questions: list[Question] = []
        self.conversations: dict[str, FakeConversation] = {}
        self._failures: deque[ChatEngineError] = deque()

    # --- knobs ------------------------------------------------------------------------------------------

    def fail_next(self, error: ChatEngineError, *, times: int = 1) -> None:
        """The next `times` asks raise `error` (after being recorded and delayed)."""
        self._failures.extend([error] * times)

    def forget_conversation(self, conversation_id: str) -> None:
        """Simulate Dify losing a conversation (deleted, upgrade, ...): asking with it is ConversationGone."""
        self.conversations.pop(conversation_id, None)

    def history(self, conversation_id: str) -> list[Turn]:
        return list(self.conversations[conversation_id].turns)

    def conversation_ids(self, user: str) -> list[str]:
        return [c.id for c in self.conversations.values() if c.user == user]

    # --- the port ---------------------------------------------------------------------------------------

    async def ask(self, question: Question) -> Answer:
        self.questions.append(question)
        if self.delay:
            await anyio.sleep(self.delay)
        if self._failures:
            raise self._failures.popleft()
        # Dify's own request validation (spec §0 #3), so callers meet it in unit tests too.
        if not question.user:
            raise ChatEngineError("invalid_param", "Arg user must be provided.", status=400)
        if not question.query:
            raise ChatEngineError("invalid_param", "query is required", status=400)
        conversation = self._conversation_for(question)
        reply = self.responder(question, tuple(conversation.turns))
        if inspect.isawaitable(reply):
            reply = await reply
        text, files = (reply.text, reply.files) if isinstance(reply, FakeReply) else (reply, ())
        conversation.turns.append((question.query, text))
        return Answer(text=text, conversation_id=conversation.id, message_id=str(uuid.uuid4()), files=files)

    async def info(self) -> AppInfo:
        return self.app_info

    async def parameters(self) -> AppParameters:
        return self.app_parameters

    def _conversation_for(self, question: Question) -> FakeConversation:
        if not question.conversation_id:  # Dify reads "" as "start a new conversation" too (spec §2.1)
            conversation = FakeConversation(id=str(uuid.uuid4()), user=question.user)
            self.conversations[conversation.id] = conversation
            return conversation
        # Unknown, malformed, forgotten or another user's id: Dify says 404 / invalid UUID (spec §4.2).
        found = self.conversations.get(question.conversation_id)
        if found is None or found.user != question.user:
            raise ConversationGone("Conversation Not Exists.", status=404)
        return found
