"""FakeChatEngine: an honest in-memory ChatEngine for unit tests (passes the ChatEngine contract suite)."""

from __future__ import annotations

import inspect
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel

from application.errors import ChatEngineError, ConversationGone, MediaTooLarge
from application.ports import AnswerProgress
from domain.app_form import FormField
from domain.chat import Answer, AnswerFile, AppInfo, AppParameters, Attachment, Question
from domain.media import (
    DIFY_SPEECH_LIMIT_BYTES,
    MediaBlob,
    UploadedFile,
    UploadPolicy,
    bare_type,
    dify_file_kind,
    dify_size_limit,
    extension_of,
    sniff_type,
)

Turn = tuple[str, str]  # (query, answer), oldest first


@dataclass(frozen=True, slots=True)
class FakeReply:
    """What a responder may return instead of plain text, to attach files to the answer."""

    text: str
    files: tuple[AnswerFile, ...] = ()
    # The run paused at this Human Input node (chatflow): the turn ends with `text` said so far.
    needs_human_input: str = ""


Responder = Callable[[Question, Sequence[Turn]], str | FakeReply | Awaitable[str | FakeReply]]


def echo(question: Question, history: Sequence[Turn]) -> str:
    return f"答：{question.query}"


DEFAULT_TRANSCRIPT = "你好，我想问一下保修的事。"
# /audio-to-text part types current Dify accepts (docs/dify.md §6), also with upper-case extensions.
SPEECH_TYPES = frozenset(
    [f"audio/{e}" for e in ("mp3", "m4a", "wav", "amr", "mpga")]
    + [f"audio/{e.upper()}" for e in ("mp3", "m4a", "wav", "amr", "mpga")]
)


@dataclass
class FakeConversation:
    id: str
    user: str
    turns: list[Turn] = field(default_factory=list)
    ended: bool = False  # Dify: the conversation's status is no longer "normal"


@dataclass(frozen=True, slots=True)
class RecordedFeedback:
    message_id: str
    user: str
    rating: str
    content: str


def refused_inputs(form: Sequence[FormField], inputs: Mapping[str, Any]) -> str:
    """What Dify's input validation says to `inputs` for an app declaring `form` ("" when it passes;
    undeclared names are ignored): a required variable missing, a select value outside its options, a text
    longer than its max_length (docs/dify.md)."""
    for form_field in form:
        name = form_field.variable
        value = inputs.get(name)
        if value is None or value == "":
            if form_field.required:
                return f"{name} is required in input form"
            continue
        if form_field.kind == "select" and value not in form_field.options:
            return f"{name} in input form must be one of the following: {list(form_field.options)}"
        if form_field.kind in ("text-input", "paragraph"):
            if not isinstance(value, str):
                return f"{name} in input form must be a string"
            if form_field.max_length and len(value) > form_field.max_length:
                return f"{name} in input form must be less than {form_field.max_length} characters"
    return ""


class FakeChatEngine:
    """Keeps conversations per user like Dify (docs/dify.md §0 #4); answers through a programmable
    responder."""

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
        self.uploads: dict[str, tuple[UploadedFile, str, bytes]] = {}  # id → (file, user, bytes)
        self.transcript = DEFAULT_TRANSCRIPT
        self.transcriptions: list[tuple[str, str, bytes]] = []  # (user, content type, audio)
        # What `fetch_file` serves: URL → blob (answers' files).
        self.hosted: dict[str, MediaBlob] = {}
        # Files the last questions carried that the app dropped because File Upload is off (docs/dify.md §5.4
        # #2).
        self.ignored_files = 0
        self._failures: deque[ChatEngineError] = deque()
        self._replacements: deque[str] = deque()
        self._pauses: deque[str] = deque()
        self._media_failures: dict[str, deque[ChatEngineError]] = {}
        # Streaming (progressive replies): with `stream_chunk_chars`, `progress` hears the answer that many
        # characters at a time, and `between_chunks` (if set) is awaited after each chunk but the last.
        self.streaming = False
        self.stream_chunk_chars = 0
        self.between_chunks: Callable[[str], Awaitable[None]] | None = None
        # Suggested questions after an answer: a function of the question and answer, per message id.
        self.suggestions: Callable[[str, str], Sequence[str]] | None = None
        self.suggestion_requests: list[tuple[str, str]] = []  # (user, message_id)
        self._answers: dict[str, tuple[str, str, str]] = {}  # message id → (user, query, answer)
        # Message feedback and conversation names, as Dify's logs would show them.
        self.answers: dict[str, tuple[str, str]] = {}  # message_id → (user, conversation_id)
        self.feedbacks: list[RecordedFeedback] = []
        self.conversation_names: dict[str, str] = {}
        self.name_requests: list[tuple[str, str]] = []  # (conversation_id, name), every call

    # --- knobs ------------------------------------------------------------------------------------------

    def fail_next(self, error: ChatEngineError, *, times: int = 1) -> None:
        """The next `times` asks raise `error` (after being recorded and delayed)."""
        self._failures.extend([error] * times)

    def fail_next_media(self, operation: str, error: ChatEngineError, *, times: int = 1) -> None:
        """The next `times` calls of `operation` ("upload_file", "transcribe", "fetch_file", "suggested",
        "give_feedback", "name_conversation") raise `error`."""
        self._media_failures.setdefault(operation, deque()).extend([error] * times)

    def host_file(self, url: str, data: bytes, content_type: str, filename: str = "") -> str:
        """Serve a file at `url` for `fetch_file` (an answer's file); returns `url`."""
        self.hosted[url] = MediaBlob(data, content_type, filename or url.rsplit("/", 1)[-1].split("?")[0])
        return url

    def uploaded_bytes(self, upload_file_id: str) -> bytes:
        return self.uploads[upload_file_id][2]

    def replace_next(self, text: str) -> None:
        """Output moderation flags the next answer: `text` replaces it (what `message_replace` does)."""
        self._replacements.append(text)

    def pause_next(self, node_title: str) -> None:
        """The next run stops at a Human Input node with this title: the answer is empty and marked."""
        self._pauses.append(node_title)

    def end_conversation(self, conversation_id: str) -> None:
        """The conversation is closed: asking with it fails as Dify's `conversation_completed` does."""
        self.conversations[conversation_id].ended = True

    def forget_conversation(self, conversation_id: str) -> None:
        """Simulate Dify losing a conversation (deleted, upgrade, ...): asking with it is ConversationGone."""
        self.conversations.pop(conversation_id, None)

    def history(self, conversation_id: str) -> list[Turn]:
        return list(self.conversations[conversation_id].turns)

    def conversation_ids(self, user: str) -> list[str]:
        return [c.id for c in self.conversations.values() if c.user == user]

    # --- the port ---------------------------------------------------------------------------------------

    async def ask(self, question: Question, progress: AnswerProgress | None = None) -> Answer:
        self.questions.append(question)
        if self.delay:
            await anyio.sleep(self.delay)
        if self._failures:
            raise self._failures.popleft()
        # Dify's own request validation (docs/dify.md §0 #3), so callers meet it in unit tests too.
        if not question.user:
            raise ChatEngineError("invalid_param", "Arg user must be provided.", status=400)
        if not question.query:
            raise ChatEngineError("invalid_param", "query is required", status=400)
        self._check_files(question.user, question.files)
        if refusal := refused_inputs(self.app_parameters.input_form, question.inputs):
            raise ChatEngineError("invalid_param", refusal, status=400)
        conversation = self._conversation_for(question)
        if progress is not None:
            progress.accepted()
        message_id = str(uuid.uuid4())
        if self._pauses:  # the run stops before the app answers; Dify keeps no turn for it
            return Answer(
                text="",
                conversation_id=conversation.id,
                message_id=message_id,
                needs_human_input=self._pauses.popleft(),
            )
        reply = self.responder(question, tuple(conversation.turns))
        if inspect.isawaitable(reply):
            reply = await reply
        if not isinstance(reply, FakeReply):
            reply = FakeReply(reply)
        if progress is not None and reply.text:
            await self._stream(reply.text, progress)
        text = self._replacements.popleft() if self._replacements else reply.text
        if progress is not None and text != reply.text:
            progress.streamed(text)  # output moderation replaced what was streamed
        if reply.needs_human_input:
            return Answer(
                text=text,
                conversation_id=conversation.id,
                message_id=message_id,
                files=reply.files,
                needs_human_input=reply.needs_human_input,
            )
        conversation.turns.append((question.query, text))
        self._answers[message_id] = (question.user, question.query, text)
        while len(self._answers) > 1000:
            del self._answers[next(iter(self._answers))]
        self.answers[message_id] = (question.user, conversation.id)
        return Answer(text=text, conversation_id=conversation.id, message_id=message_id, files=reply.files)

    async def _stream(self, text: str, progress: AnswerProgress) -> None:
        size = self.stream_chunk_chars
        if size <= 0 or len(text) <= size:
            progress.streamed(text)
            return
        for end in range(size, len(text) + size, size):
            progress.streamed(text[:end])
            if end < len(text):
                if self.between_chunks is not None:
                    await self.between_chunks(text[:end])
                else:
                    await anyio.lowlevel.checkpoint()

    @property
    def streams_answers(self) -> bool:
        return self.streaming

    async def suggested(self, user: str, message_id: str) -> list[str]:
        await anyio.lowlevel.checkpoint()
        self.suggestion_requests.append((user, message_id))
        self._take_media_failure("suggested")
        if not self.app_parameters.suggestions_after_answer or self.suggestions is None:
            # Dify: 400 bad_request "Suggested Questions Is Disabled." (docs/dify.md)
            raise ChatEngineError("bad_request", "Suggested Questions Is Disabled.", status=400)
        answered = self._answers.get(message_id)
        if answered is None or answered[0] != user:
            raise ChatEngineError("not_found", "Message Not Exists.", status=404)
        return list(self.suggestions(answered[1], answered[2]))

    async def info(self) -> AppInfo:
        return self.app_info

    async def parameters(self) -> AppParameters:
        return self.app_parameters

    async def upload_file(self, user: str, filename: str, content_type: str, data: bytes) -> UploadedFile:
        await anyio.lowlevel.checkpoint()
        self._take_media_failure("upload_file")
        # Dify's own checks (docs/dify.md §5.1, §5.3), in its order.
        if not filename:
            raise ChatEngineError(
                "filename_not_exists_error", "The specified filename does not exist.", status=400
            )
        if "/" in filename or "\\" in filename:
            raise ChatEngineError("invalid_param", "Filename contains invalid characters", status=400)
        if not content_type:
            raise ChatEngineError("unsupported_file_type", "File type not allowed.", status=415)
        name = filename[:200]
        extension = extension_of(name)
        limits = self.app_parameters
        kind = dify_file_kind(extension)
        limit = dify_size_limit(
            kind if kind in ("image", "audio") else "document",
            file_mb=limits.file_size_limit_mb,
            image_mb=limits.image_file_size_limit_mb,
            audio_mb=limits.audio_file_size_limit_mb,
        )
        if len(data) > limit:
            raise ChatEngineError("file_too_large", f"File size exceeded. {name}", status=413)
        uploaded = UploadedFile(
            id=str(uuid.uuid4()), name=name, size=len(data), extension=extension, mime_type=content_type
        )
        self.uploads[uploaded.id] = (uploaded, user or "DEFAULT-USER", bytes(data))
        return uploaded

    async def transcribe(self, user: str, audio: bytes, content_type: str) -> str:
        await anyio.lowlevel.checkpoint()
        self._take_media_failure("transcribe")
        if not self.app_parameters.speech_to_text:
            raise ChatEngineError("speech_to_text_disabled", "Speech to text is disabled.", status=400)
        if not audio:
            raise ChatEngineError("no_audio_uploaded", "Please upload your audio.", status=400)
        declared = content_type.split(";", 1)[0].strip()
        if declared not in SPEECH_TYPES:
            raise ChatEngineError("unsupported_audio_type", "Audio type not allowed.", status=415)
        if len(audio) > DIFY_SPEECH_LIMIT_BYTES:
            raise ChatEngineError("audio_too_large", "Audio size larger than 30 mb", status=413)
        kind = bare_type(declared)
        if kind == "audio/amr" or (kind in ("audio/wav", "audio/mp3") and sniff_type(audio) != kind):
            # What the speech model says to bytes it cannot decode (Whisper takes no AMR, docs/dify.md §6).
            raise ChatEngineError(
                "completion_request_error", "[openai] Error: Invalid file format.", status=400
            )
        self.transcriptions.append((user, declared, bytes(audio)))
        return self.transcript

    async def fetch_file(self, url: str, *, max_bytes: int) -> MediaBlob:
        await anyio.lowlevel.checkpoint()
        self._take_media_failure("fetch_file")
        blob = self.hosted.get(url)
        if blob is None:
            raise ChatEngineError("http_404", "GET file: HTTP 404", status=404)
        if blob.size > max_bytes:
            raise MediaTooLarge(max_bytes, blob.size, what="file")
        return blob

    async def give_feedback(self, message_id: str, *, user: str, rating: str, content: str) -> None:
        await anyio.lowlevel.checkpoint()
        self._take_media_failure("give_feedback")
        found = self.answers.get(message_id)
        if found is None or found[0] != user:
            raise ChatEngineError("not_found", "Message Not Exists.", status=404)
        if rating not in ("like", "dislike"):
            raise ChatEngineError("invalid_param", "rating must be like, dislike or null", status=400)
        self.feedbacks.append(RecordedFeedback(message_id, user, rating, content))

    async def name_conversation(self, conversation_id: str, *, user: str, name: str) -> None:
        await anyio.lowlevel.checkpoint()
        self._take_media_failure("name_conversation")
        found = self.conversations.get(conversation_id)
        if found is None or found.user != user:
            raise ChatEngineError("not_found", "Conversation Not Exists.", status=404)
        self.name_requests.append((conversation_id, name))
        self.conversation_names[conversation_id] = name

    def _take_media_failure(self, operation: str) -> None:
        queue = self._media_failures.get(operation)
        if queue:
            raise queue.popleft()

    def _check_files(self, user: str, files: Sequence[Attachment]) -> None:
        """Dify's file factory (docs/dify.md §5.4): ignored when File Upload is off, else own uploads of
        allowed and
        truthful types."""
        if not files:
            return
        policy = UploadPolicy.of(self.app_parameters.file_upload)
        if not policy.enabled:
            self.ignored_files += len(files)
            return
        for attachment in files:
            found = self.uploads.get(attachment.upload_file_id)
            if found is None or found[1] != user:
                raise ChatEngineError("invalid_param", "Invalid upload file", status=400)
            uploaded = found[0]
            if policy.kind_for(uploaded.extension) is None or (
                attachment.kind != "custom" and attachment.kind != dify_file_kind(uploaded.extension)
            ):
                raise ChatEngineError(
                    "invalid_param", f"File validation failed for file: {uploaded.name}", status=400
                )

    def _conversation_for(self, question: Question) -> FakeConversation:
        # Dify reads "" as "start a new conversation" too (docs/dify.md §2.1)
        if not question.conversation_id:
            conversation = FakeConversation(id=str(uuid.uuid4()), user=question.user)
            self.conversations[conversation.id] = conversation
            return conversation
        # Unknown, malformed, forgotten or another user's id: Dify says 404 / invalid UUID (docs/dify.md
        # §4.2).
        found = self.conversations.get(question.conversation_id)
        if found is None or found.user != question.user:
            raise ConversationGone("Conversation Not Exists.", status=404)
        if found.ended:  # Dify's 400 conversation_completed: the caller starts a new conversation
            raise ConversationGone("The conversation has ended. Please start a new conversation.", status=400)
        return found
