"""FakeDifyServer: a Starlette app speaking Dify's service API (docs/dify.md), programmable by tests."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from adapters.outbound.fake_dify import RecordedFeedback, refused_inputs
from domain.app_form import parse_input_form
from tests.support.multipart import MultipartError, Part, parse_form
from tests.support.schema_check import dify_schemas, problems

Turn = tuple[str, str]  # (query, answer), oldest first
AnswerFunction = Callable[[str, Sequence[Turn]], str]
# (audio bytes, part content type) → transcript.
TranscribeFunction = Callable[[bytes, str], str]

PING = b"event: ping\n\n"
_EVENT_STREAM = "text/event-stream"
MB = 1024 * 1024
DEFAULT_TRANSCRIPT = "你好，我想问一下保修的事。"

# Dify's extension lists decide an upload's size category and its detected type (docs/dify.md §5.1, §5.4 #3).
_IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "gif", "svg"}
_VIDEO_EXTS = {"mp4", "mov", "mpeg", "webm"}
_AUDIO_EXTS = {"mp3", "m4a", "wav", "amr", "mpga"}
_DOCUMENT_EXTS = {"txt", "markdown", "md", "mdx", "pdf", "html", "htm", "xlsx", "xls", "docx", "csv", "vtt"}
# /audio-to-text part types of current Dify (docs/dify.md §6): audio/<ext>, also with upper-case extensions.
_SPEECH_TYPES = {f"audio/{e}" for e in ("mp3", "m4a", "wav", "amr", "mpga")}
_SPEECH_TYPES |= {f"audio/{e.upper()}" for e in ("mp3", "m4a", "wav", "amr", "mpga")}
SPEECH_LIMIT = 30 * MB


def default_transcript(audio: bytes, content_type: str) -> str:
    return DEFAULT_TRANSCRIPT


def echo_answer(query: str, history: Sequence[Turn]) -> str:
    return f"答：{query}"


@dataclass
class Fault:
    """One scripted deviation for the next request to `path` (consumed in order, first match wins)."""

    path: str = "/v1/chat-messages"
    # Answer with this HTTP status and body instead: a dict goes out as JSON, a str as-is (a gateway's HTML).
    status: int | None = None
    body: Any = None
    content_type: str | None = None
    # Extra response headers with that status (e.g. Retry-After on a 429 or 503).
    headers: Mapping[str, str] | None = None
    # Slow first byte: wait this long before sending the response headers.
    delay: float = 0.0
    # In-stream `error` event after N answer chunks (blocking: an HTTP error with the same envelope).
    error_after: int | None = None
    error_code: str = "completion_request_error"
    error_message: str = "[openai] Rate Limit Error"
    error_status: int = 400
    # The stream ends (clean EOF) after N answer chunks, with no terminal event.
    eof_after: int | None = None
    # The stream sends only pings until the client gives up (or `hang_limit`) ...
    pings_only: bool = False
    # ... or does so after N answer chunks.
    stall_after: int | None = None
    # Output moderation: `message_replace` with this text just before message_end.
    replace_with: str | None = None
    # Tool-generated files: one `message_file` event per (type, url) ...
    files: tuple[tuple[str, str], ...] = ()
    # ... or, as newer builds also do, listed in message_end's `files` instead.
    files_in_message_end: bool = False
    # Chatflow only: the run fails (workflow_finished failed, then an `error` event unless told otherwise).
    workflow_failed: bool = False
    error_after_workflow_failed: bool = True
    # Chatflow only: a Human Input node pauses the run: human_input_required, then workflow_paused, then the
    # stream ends (docs/dify.md). `paused_after` answer chunks are streamed first (an Answer node before it).
    workflow_paused: bool = False
    paused_after: int = 0
    human_input_title: str = "人工审核"
    # Chatflow LLM node with reasoning_format "separated": reasoning_chunk deltas (then is_final) first.
    reasoning: str | None = None
    # Text-to-speech auto-play: a tts_message per answer chunk, tts_message_end after message_end.
    tts: bool = False
    # Chatflow: node_retry, iteration_*, loop_* and agent_log events before the answer.
    progress_events: bool = False
    # An event no Dify of today sends (a newer Dify's), mid-stream.
    unknown_event: bool = False
    # A ping (`event: ping`, no data) before every event.
    pings_between: bool = False
    # Dify 1.13.0 (docs/dify.md §8.3 #32351): a blocking request is answered with text/event-stream.
    sse_for_blocking: bool = False
    # Dify #21568: the stream stays open (pinging) after the terminal event.
    keep_open_after_end: bool = False


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: Mapping[str, str]  # lower-case names
    json: Any
    query: Mapping[str, str]
    form: tuple[Part, ...] = ()  # multipart requests (uploads): every part with its own headers


# Every request any FakeDifyServer received in this test session, for the conformance test.
SESSION_REQUESTS: list[RecordedRequest] = []


@dataclass
class _Conversation:
    id: str
    user: str
    turns: list[Turn] = field(default_factory=list)
    status: str = "normal"


@dataclass(frozen=True)
class StoredUpload:
    """A file uploaded through /files/upload: it belongs to `user` (docs/dify.md §0 #8)."""

    id: str
    name: str
    size: int
    extension: str
    mime_type: str
    user: str
    data: bytes
    created_at: int


@dataclass(frozen=True)
class HostedFile:
    data: bytes
    content_type: str


@dataclass
class _Sleep:
    seconds: float


@dataclass
class _Call:
    action: Callable[[], None]


@dataclass
class _Ping:
    pass


@dataclass
class _Wait:
    """The stream waits (pinging) until `until()` holds, at most `hang_limit`."""

    until: Callable[[], bool]


_Step = Mapping[str, Any] | _Sleep | _Call | _Ping | _Wait


class FakeDifyServer:
    """One Dify app behind one API key: chat, agent-chat, advanced-chat or agent (New Agent) mode."""

    def __init__(
        self,
        *,
        api_key: str = "app-fake-key",
        mode: str = "chat",
        app_name: str = "Fake Dify app",
        answer: AnswerFunction = echo_answer,
        chunk_size: int = 4,
        chunk_delay: float = 0.0,
        ping_interval: float = 10.0,
        hang_limit: float = 30.0,
        opening_statement: str | None = None,
        suggested_questions: Sequence[str] = (),
        speech_to_text: bool = False,
        file_upload: Mapping[str, Any] | None = None,
        system_parameters: Mapping[str, Any] | None = None,
        not_found_suffix: str = "",
        hang_on_unknown_conversation: bool = False,
        transcribe: TranscribeFunction = default_transcript,
        user_input_form: Sequence[Mapping[str, Any]] = (),
        capacity: int | None = None,
        capacity_retry_after: float | None = None,
    ) -> None:
        self.api_key = api_key
        self.mode = mode
        self.app_name = app_name
        self.answer = answer
        self.chunk_size = chunk_size
        self.chunk_delay = chunk_delay
        self.ping_interval = ping_interval
        self.hang_limit = hang_limit  # cap for streams that would otherwise never end
        self.opening_statement = opening_statement
        self.suggested_questions = tuple(suggested_questions)
        self.speech_to_text = speech_to_text
        self.file_upload: dict[str, Any] = dict(file_upload) if file_upload is not None else {}
        self.system_parameters: dict[str, Any] = (
            dict(system_parameters)
            if system_parameters is not None
            else {
                "file_size_limit": 15,
                "image_file_size_limit": 10,
                "audio_file_size_limit": 50,
                "video_file_size_limit": 100,
                "workflow_file_upload_limit": 10,
            }
        )
        # Flask's hint appended to 404 messages in some versions (docs/dify.md §8.3 #28481).
        self.not_found_suffix = not_found_suffix
        # Dify #38800 (docs/dify.md §8.3): streaming with an unknown conversation id pings forever instead of
        # 404.
        self.hang_on_unknown_conversation = hang_on_unknown_conversation
        self.transcribe = transcribe
        # An app's concurrency cap: a chat request arriving while `capacity` answers are in flight is refused
        # at once with 429 too_many_requests (docs/dify.md), with Retry-After when `capacity_retry_after`.
        self.capacity = capacity
        self.capacity_retry_after = capacity_retry_after
        self.answering = 0  # chat requests accepted and not yet answered in full
        self.peak_answering = 0
        self.over_capacity = 0  # requests refused with 429 for the cap
        self.uploads: dict[str, StoredUpload] = {}
        self.hosted: dict[str, HostedFile] = {}
        # Files chat requests carried that Dify ignored because the app's File Upload feature is off.
        self.ignored_files = 0
        self.requests: list[RecordedRequest] = []
        # Requests that broke docs/dify-schemas.json (answered 400 invalid_param, as Dify's validation does).
        self.schema_violations: list[tuple[str, list[str]]] = []
        self.faults: deque[Fault] = deque()
        self.conversations: dict[str, _Conversation] = {}
        self.pings_sent = 0
        self.active_streams = 0
        # Output moderation (`sensitive_word_avoidance`) as `/parameters` reports it.
        self.moderation = False
        # "Suggested questions after answer": on when set; the questions for (query, answer).
        self.suggest: Callable[[str, str], Sequence[str]] | None = None
        self.answered: dict[str, tuple[str, str, str]] = {}  # message id → (user, query, answer)
        # (chunk index, condition): streams wait before that answer chunk until the condition holds (what the
        # client did meanwhile, e.g. a part of the answer already reached the customer).
        self.hold: tuple[int, Callable[[], bool]] | None = None
        # The app's declared input variables, as /parameters lists them (docs/dify.md); chat requests are
        # checked against them as Dify does. What the app's logs show: feedback and conversation names.
        self.user_input_form: list[dict[str, Any]] = [dict(item) for item in user_input_form]
        self.answers: dict[str, tuple[str, str]] = {}  # message_id → (user, conversation_id)
        self.feedbacks: list[RecordedFeedback] = []
        self.conversation_names: dict[str, str] = {}
        self._app = Starlette(
            routes=[
                Route("/v1/chat-messages", self._chat_messages, methods=["POST"]),
                Route("/v1/info", self._info, methods=["GET"]),
                Route("/v1/parameters", self._parameters, methods=["GET"]),
                Route("/v1/files/upload", self._files_upload, methods=["POST"]),
                Route("/v1/audio-to-text", self._audio_to_text, methods=["POST"]),
                Route("/v1/messages/{message_id}/suggested", self._suggested, methods=["GET"]),
                Route("/v1/messages/{message_id}/feedbacks", self._feedbacks, methods=["POST"]),
                Route("/v1/conversations/{conversation_id}/name", self._rename, methods=["POST"]),
                Route("/files/tools/{name}", self._hosted_file, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_exception},
        )

    @property
    def app(self) -> Starlette:
        return self._app

    # --- knobs ------------------------------------------------------------------------------------------

    def inject(self, fault: Fault) -> None:
        self.faults.append(fault)

    def history(self, conversation_id: str) -> list[Turn]:
        return list(self.conversations[conversation_id].turns)

    def delete_conversation(self, conversation_id: str) -> None:
        """Soft delete, as DELETE /conversations/{id} does: the id then gives 404 on chat."""
        self.conversations.pop(conversation_id, None)

    def end_conversation(self, conversation_id: str) -> None:
        """The conversation's status is no longer `normal`: chat gives 400 conversation_completed."""
        self.conversations[conversation_id].status = "ended"

    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == "/v1/chat-messages"]

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    def host_file(self, data: bytes, content_type: str, extension: str) -> str:
        """Serve `data` like a tool-generated file; returns the signed, host-relative URL Dify would put in a
        `message_file` event (docs/dify.md §3.3)."""
        name = f"{uuid.uuid4()}.{extension}"
        self.hosted[name] = HostedFile(data, content_type)
        return f"/files/tools/{name}?timestamp={int(time.time())}&nonce=n0&sign=s1g"

    # --- endpoints --------------------------------------------------------------------------------------

    async def _chat_messages(self, request: Request) -> Response:
        body = await self._record(request)
        if (denied := self._auth(request)) is not None:
            return denied
        fault = self._take_fault(request.url.path)
        if fault is not None and fault.delay:
            await anyio.sleep(fault.delay)
        if fault is not None and fault.status is not None:
            return _raw(fault.status, fault.body, fault.content_type, fault.headers)
        if self.capacity is not None and self.answering >= self.capacity:
            self.over_capacity += 1
            after = self.capacity_retry_after
            return _raw(
                429,
                {
                    "code": "too_many_requests",
                    "message": "Too many requests. The current maximum concurrent requests allowed "
                    f"is {self.capacity}.",
                    "status": 429,
                },
                None,
                {"Retry-After": f"{after:g}"} if after is not None else None,
            )
        if not isinstance(body, dict):
            return _error(400, "invalid_param", "Invalid JSON body")
        user = body.get("user")
        if not isinstance(user, str) or not user:
            return _error(400, "invalid_param", "Arg user must be provided.")
        response_mode = body.get("response_mode") or "blocking"  # omitted means blocking (docs/dify.md §0 #2)
        if response_mode not in ("blocking", "streaming"):
            return _error(400, "invalid_param", "response_mode must be 'blocking' or 'streaming'")
        if not isinstance(body.get("inputs"), dict):
            return _error(400, "invalid_param", "inputs: Field required")
        conversation_id = body.get("conversation_id") or ""
        if conversation_id and not _is_uuid(conversation_id):
            return _error(400, "invalid_param", "conversation_id must be a valid UUID")
        query = body.get("query")
        if not isinstance(query, str) or not query:
            return _error(400, "invalid_param", "query is required")
        files = body.get("files") or []
        if not isinstance(files, list) or not all(_is_file_reference(f) for f in files):
            return _error(400, "invalid_param", "Invalid upload file id format")
        if files and not self._file_upload_on():
            self.ignored_files += len(files)  # Chatbot/Agent silently drop files (docs/dify.md §5.4 #2)
        elif files and (refused := self._check_files(files, user)) is not None:
            return refused
        if (refused := self._nonconforming("POST /chat-messages", body)) is not None:
            return refused
        if refusal := refused_inputs(parse_input_form(self.user_input_form), body["inputs"]):
            return _error(400, "invalid_param", refusal)
        streaming = response_mode == "streaming"
        if not streaming and self.mode in ("agent-chat", "agent"):
            if fault is not None:  # the app never ran: the scripted run is the next one's
                self.faults.appendleft(fault)
            if self.mode == "agent-chat":
                return _error(400, "invalid_param", "Agent Chat App does not support blocking mode")
            return _error(400, "bad_request", "Agent App only supports streaming response mode.")

        if conversation_id:
            conversation = self.conversations.get(conversation_id)
            if conversation is None or conversation.user != user:
                if streaming and self.hang_on_unknown_conversation:
                    return self._stream([_Sleep(self.hang_limit)])
                return _error(404, "not_found", "Conversation Not Exists." + self.not_found_suffix)
            if conversation.status != "normal":
                return _error(
                    400,
                    "conversation_completed",
                    "The conversation has ended. Please start a new conversation.",
                )
        else:
            # Dify creates the conversation before generating, so even a failed first turn leaves it behind.
            conversation = _Conversation(id=str(uuid.uuid4()), user=user)
            self.conversations[conversation.id] = conversation

        fault = fault or Fault()
        text = self.answer(query, tuple(conversation.turns))
        if fault.replace_with is not None:
            final = fault.replace_with
        else:
            final = text
        message_id = str(uuid.uuid4())
        task_id = str(uuid.uuid4())

        def remember() -> None:
            conversation.turns.append((query, final))
            self.answered[message_id] = (user, query, final)
            self.answers[message_id] = (user, conversation.id)

        if streaming or fault.sse_for_blocking:
            self._answering(+1)
            steps = self._events(conversation, query, text, message_id, task_id, fault, remember)
            return self._stream([*steps, _Call(lambda: self._answering(-1))], counted=True)
        if fault.error_after is not None:
            return _error(fault.error_status, fault.error_code, fault.error_message)
        if fault.pings_only or fault.eof_after is not None or fault.stall_after is not None:
            await anyio.sleep(self.hang_limit)  # blocking has no stream to break: it just never answers
        remember()
        return JSONResponse(
            {
                "event": "message",
                "task_id": task_id,
                "id": message_id,
                "message_id": message_id,
                "conversation_id": conversation.id,
                "mode": self.mode,
                "answer": final,
                "metadata": {"usage": _USAGE, "retriever_resources": []},
                "created_at": int(time.time()),
            }
        )

    async def _info(self, request: Request) -> Response:
        await self._record(request)
        if (denied := self._auth(request)) is not None:
            return denied
        if (fault := self._take_fault(request.url.path)) is not None:
            await anyio.sleep(fault.delay)
            if fault.status is not None:
                return _raw(fault.status, fault.body, fault.content_type, fault.headers)
        if (refused := self._nonconforming("GET /info", None)) is not None:
            return refused
        return JSONResponse(
            {"name": self.app_name, "description": "", "tags": [], "mode": self.mode, "author_name": "test"}
        )

    async def _parameters(self, request: Request) -> Response:
        await self._record(request)
        if (denied := self._auth(request)) is not None:
            return denied
        if (fault := self._take_fault(request.url.path)) is not None:
            await anyio.sleep(fault.delay)
            if fault.status is not None:
                return _raw(fault.status, fault.body, fault.content_type, fault.headers)
        if (refused := self._nonconforming("GET /parameters", None)) is not None:
            return refused
        return JSONResponse(
            {
                "opening_statement": self.opening_statement,
                "suggested_questions": list(self.suggested_questions),
                "suggested_questions_after_answer": {"enabled": self.suggest is not None},
                "speech_to_text": {"enabled": self.speech_to_text},
                "text_to_speech": {"enabled": False, "voice": "", "language": "", "autoPlay": "disabled"},
                "retriever_resource": {"enabled": True},
                "annotation_reply": {"enabled": False},
                "more_like_this": {"enabled": False},
                "sensitive_word_avoidance": {
                    "enabled": self.moderation,
                    "type": "keywords" if self.moderation else "",
                    "configs": [],
                },
                "user_input_form": self.user_input_form,
                "file_upload": self.file_upload,
                "system_parameters": self.system_parameters,
            }
        )

    async def _suggested(self, request: Request) -> Response:
        """`GET /messages/{id}/suggested?user=`: 400 when the feature is off, 404 for another user's or an
        unknown message (docs/dify.md)."""
        await self._record(request)
        if (denied := self._auth(request)) is not None:
            return denied
        if (faulted := await self._fault_response(request.url.path)) is not None:
            return faulted
        if (refused := self._nonconforming("GET /messages/{message_id}/suggested", None)) is not None:
            return refused
        if self.suggest is None:
            return _error(400, "bad_request", "Suggested Questions Is Disabled.")
        answered = self.answered.get(request.path_params["message_id"])
        if answered is None or answered[0] != request.query_params.get("user"):
            return _error(404, "not_found", "Message Not Exists.")
        questions = [q for q in self.suggest(answered[1], answered[2]) if isinstance(q, str)]
        return JSONResponse({"result": "success", "data": questions})

    async def _feedbacks(self, request: Request) -> Response:
        """POST /messages/{message_id}/feedbacks (docs/dify.md): the answer must be this user's."""
        body = await self._record(request)
        if (denied := self._auth(request)) is not None:
            return denied
        if (early := await self._fault_response(request.url.path)) is not None:
            return early
        if (refused := self._nonconforming("POST /messages/{message_id}/feedbacks", body)) is not None:
            return refused
        message_id = request.path_params["message_id"]
        found = self.answers.get(message_id)
        if found is None or found[0] != body["user"]:
            return _error(404, "not_found", "Message Not Exists.")
        self.feedbacks.append(
            RecordedFeedback(message_id, body["user"], body.get("rating") or "", body.get("content") or "")
        )
        return JSONResponse({"result": "success"})

    async def _rename(self, request: Request) -> Response:
        """POST /conversations/{conversation_id}/name (docs/dify.md): the conversation must be this user's."""
        body = await self._record(request)
        if (denied := self._auth(request)) is not None:
            return denied
        if (early := await self._fault_response(request.url.path)) is not None:
            return early
        if (refused := self._nonconforming("POST /conversations/{conversation_id}/name", body)) is not None:
            return refused
        conversation = self.conversations.get(request.path_params["conversation_id"])
        if conversation is None or conversation.user != body.get("user"):
            return _error(404, "not_found", "Conversation Not Exists.")
        name = body.get("name") or ""
        if not name and body.get("auto_generate") is not True:
            return _error(400, "invalid_param", "name is required")
        self.conversation_names[conversation.id] = name
        return JSONResponse({"id": conversation.id, "name": name, "status": conversation.status})

    async def _files_upload(self, request: Request) -> Response:
        """POST /files/upload (docs/dify.md §5.1–5.3): one `file` part with a name, an extension and a
        type."""
        await self._record(request)
        if (denied := self._auth(request)) is not None:
            return denied
        if (early := await self._fault_response(request.url.path)) is not None:
            return early
        parts = self.requests[-1].form
        files = [p for p in parts if p.filename is not None]
        upload = next((p for p in files if p.name == "file"), None)
        if upload is None:
            return _error(400, "no_file_uploaded", "Please upload your file.")
        if (refused := self._nonconforming("POST /files/upload", _form_fields(parts))) is not None:
            return refused
        if len(files) > 1:
            return _error(400, "too_many_files", "Only one file is allowed.")
        name = upload.filename or ""
        if not name:
            return _error(400, "filename_not_exists_error", "The specified filename does not exist.")
        if "/" in name or "\\" in name:
            return _error(400, "invalid_param", "Filename contains invalid characters")
        if not upload.content_type:
            return _error(415, "unsupported_file_type", "File type not allowed.")
        name = name[:200]
        extension = name.rpartition(".")[2].lower() if "." in name else ""
        limit_mb = self._limit_mb(extension)
        if len(upload.data) > limit_mb * MB:
            return _error(413, "file_too_large", "")  # Dify's message is empty here (docs/dify.md)
        user = next((p.text for p in parts if p.name == "user" and p.filename is None), "") or "DEFAULT-USER"
        stored = StoredUpload(
            id=str(uuid.uuid4()),
            name=name,
            size=len(upload.data),
            extension=extension,
            mime_type=upload.content_type,
            user=user,
            data=upload.data,
            created_at=int(time.time()),
        )
        self.uploads[stored.id] = stored
        return JSONResponse(
            {
                "id": stored.id,
                "name": stored.name,
                "size": stored.size,
                "extension": stored.extension or None,
                "mime_type": stored.mime_type,
                "created_by": str(uuid.uuid5(uuid.NAMESPACE_URL, user)),
                "created_at": stored.created_at,
                "preview_url": None,
                "source_url": f"/files/{stored.id}/file-preview?timestamp=0&nonce=n&sign=s",
            },
            status_code=201,
        )

    async def _audio_to_text(self, request: Request) -> Response:
        """POST /audio-to-text (docs/dify.md §6): judged by the part's Content-Type, never the file name."""
        await self._record(request)
        if (denied := self._auth(request)) is not None:
            return denied
        if (early := await self._fault_response(request.url.path)) is not None:
            return early
        if not self.speech_to_text:
            return _error(400, "speech_to_text_disabled", "Speech to text is disabled.")
        parts = self.requests[-1].form
        audio = next((p for p in parts if p.name == "file" and p.filename is not None), None)
        if audio is None:
            return _error(400, "no_audio_uploaded", "Please upload your audio.")
        if (refused := self._nonconforming("POST /audio-to-text", _form_fields(parts))) is not None:
            return refused
        declared = (audio.content_type or "").split(";", 1)[0].strip()
        if declared not in _SPEECH_TYPES:
            return _error(415, "unsupported_audio_type", "Audio type not allowed.")
        if len(audio.data) > SPEECH_LIMIT:
            return _error(413, "audio_too_large", "Audio size larger than 30 mb")
        if not _looks_like(declared, audio.data):
            # What the speech model says to bytes it cannot decode (Whisper lists no AMR, docs/dify.md §6).
            return _error(400, "completion_request_error", "[openai] Error: Invalid file format.")
        return JSONResponse({"text": self.transcribe(audio.data, declared)})

    async def _hosted_file(self, request: Request) -> Response:
        await self._record(request)
        hosted = self.hosted.get(request.path_params["name"])
        if hosted is None or not request.query_params.get("sign"):
            return _error(404, "not_found", "File not found")
        return Response(hosted.data, media_type=hosted.content_type)

    async def _fault_response(self, path: str) -> Response | None:
        fault = self._take_fault(path)
        if fault is None:
            return None
        await anyio.sleep(fault.delay)
        if fault.status is None:
            return None
        return _raw(fault.status, fault.body, fault.content_type, fault.headers)

    def _nonconforming(self, operation: str, body: Any) -> Response | None:
        """400 invalid_param for a request that breaks Dify's published request schema (what Dify's own
        validation answers); every such request is also kept in `schema_violations`."""
        schema = dify_schemas()["requests"][operation]
        request = self.requests[-1]
        found = problems(schema["body"], body) if "body" in schema else []
        if "body" not in schema and request.json is not None:
            found.append("$: this endpoint takes no body")
        if "query" in schema:
            found += problems(schema["query"], dict(request.query), "query")
        if not found:
            return None
        self.schema_violations.append((operation, found))
        return _error(400, "invalid_param", "; ".join(found)[:500])

    def _limit_mb(self, extension: str) -> int:
        limits = self.system_parameters
        if extension in _IMAGE_EXTS:
            return int(limits.get("image_file_size_limit") or 10)
        if extension in _VIDEO_EXTS:
            return int(limits.get("video_file_size_limit") or 100)
        if extension in _AUDIO_EXTS:
            return int(limits.get("audio_file_size_limit") or 50)
        return int(limits.get("file_size_limit") or 15)

    def _file_upload_on(self) -> bool:
        legacy = self.file_upload.get("image")
        return self.file_upload.get("enabled") is True or (
            isinstance(legacy, Mapping) and legacy.get("enabled") is True
        )

    def _check_files(self, files: list[dict[str, Any]], user: str) -> Response | None:
        """Dify's file factory (docs/dify.md §5.4): own uploads of allowed, truthful types, within the
        counts."""
        legacy = self.file_upload.get("image")
        allowed = set(self.file_upload.get("allowed_file_types") or [])
        if isinstance(legacy, Mapping) and legacy.get("enabled") is True:
            allowed.add("image")
        extensions = {e.lower().lstrip(".") for e in self.file_upload.get("allowed_file_extensions") or []}
        for reference in files:
            stored = self.uploads.get(reference.get("upload_file_id", ""))
            if stored is None or stored.user != user:
                return _error(400, "invalid_param", "Invalid upload file")
            kind = reference["type"]
            if kind not in allowed and not ("custom" in allowed and stored.extension in extensions):
                return _error(400, "invalid_param", f"File validation failed for file: {stored.name}")
            if kind != "custom" and kind != _detected(stored.extension):
                return _error(
                    400,
                    "invalid_param",
                    "Detected file type does not match the specified type. Please verify the file.",
                )
        images = sum(1 for f in files if f["type"] == "image")
        image_limit = legacy.get("number_limits") if isinstance(legacy, Mapping) else None
        total_limit = self.file_upload.get("number_limits")
        if isinstance(image_limit, int) and images > image_limit:
            return _error(
                400, "invalid_param", f"Number of image files exceeds the maximum limit {image_limit}"
            )
        if isinstance(total_limit, int) and len(files) > total_limit:
            return _error(400, "invalid_param", f"Number of files exceeds the maximum limit {total_limit}")
        return None

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "bad_request")
        return _error(status, code, f"The requested URL was not found on the server ({request.url.path}).")

    # --- plumbing ---------------------------------------------------------------------------------------

    async def _record(self, request: Request) -> Any:
        raw = await request.body()
        form: tuple[Part, ...] = ()
        content_type = request.headers.get("content-type", "")
        body: Any = None
        if content_type.lower().startswith("multipart/"):
            try:
                form = tuple(parse_form(content_type, raw))
            except MultipartError:
                form = ()
        else:
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
        recorded = RecordedRequest(
            method=request.method,
            path=request.url.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            json=body,
            query=dict(request.query_params),
            form=form,
        )
        self.requests.append(recorded)
        # The session keeps requests without file contents (uploads run to megabytes).
        light = tuple(dataclasses.replace(p, data=b"") if p.filename is not None else p for p in form)
        SESSION_REQUESTS.append(dataclasses.replace(recorded, form=light))
        return body

    def _auth(self, request: Request) -> Response | None:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if not key:
            return _error(
                401, "unauthorized", "Authorization header must be provided and start with 'Bearer'"
            )
        if scheme.lower() != "bearer":
            return _error(401, "unauthorized", "Authorization scheme must be 'Bearer'")
        if key.strip() != self.api_key:
            return _error(401, "unauthorized", "Access token is invalid")
        return None

    def _take_fault(self, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.path == path:
                self.faults.remove(fault)
                return fault
        return None

    def _events(
        self,
        conversation: _Conversation,
        query: str,
        text: str,
        message_id: str,
        task_id: str,
        fault: Fault,
        remember: Callable[[], None],
    ) -> list[_Step]:
        common = {
            "conversation_id": conversation.id,
            "message_id": message_id,
            "created_at": int(time.time()),
            "task_id": task_id,
        }

        def event(name: str, **fields: Any) -> dict[str, Any]:
            return {"event": name, **common, **fields}

        if fault.pings_only:
            return [_Sleep(self.hang_limit)]
        chunks = [text[i : i + self.chunk_size] for i in range(0, len(text), self.chunk_size)] or [""]
        chatflow = self.mode == "advanced-chat"
        agent = self.mode in ("agent-chat", "agent")
        run_id = str(uuid.uuid4())

        def workflow(name: str, **data: Any) -> dict[str, Any]:
            return event(name, workflow_run_id=run_id, data={"id": run_id, **data})

        def node(name: str, node_id: str, node_type: str, **data: Any) -> dict[str, Any]:
            return workflow(name, node_id=node_id, node_type=node_type, title=node_type.upper(), **data)

        steps: list[_Step] = []
        if chatflow:
            steps += [
                workflow(
                    "workflow_started", workflow_id="wf-1", inputs={"sys.query": query}, reason="initial"
                ),
                node("node_started", "start", "start", index=1),
                node("node_finished", "start", "start", index=1, status="succeeded"),
            ]
            if fault.progress_events:
                steps += _progress_events(node, event, run_id)
            steps.append(node("node_started", "llm", "llm", index=2))
            if fault.workflow_paused:
                for chunk in chunks[: fault.paused_after]:
                    steps.append(event("message", id=message_id, answer=chunk))
                return [*steps, *_pause_events(event, run_id, fault.human_input_title)]
            if fault.reasoning is not None:
                size = self.chunk_size
                pieces = [fault.reasoning[i : i + size] for i in range(0, len(fault.reasoning), size)]
                for piece in [*pieces, ""]:
                    data = {"message_id": message_id, "reasoning": piece, "node_id": "llm"}
                    steps.append(event("reasoning_chunk", data={**data, "is_final": not piece}))
            if fault.workflow_failed:
                steps += [
                    node("node_finished", "llm", "llm", index=2, status="failed", error=fault.error_message),
                    workflow("workflow_finished", status="failed", error=fault.error_message, outputs={}),
                ]
                if fault.error_after_workflow_failed:
                    steps.append(
                        event(
                            "error",
                            status=fault.error_status,
                            code=fault.error_code,
                            message=fault.error_message,
                        )
                    )
                return steps
        if agent:
            steps.append(_thought(common, position=1, thought="", tool="", observation=""))

        delta_event = "agent_message" if agent else "message"
        for index, chunk in enumerate(chunks):
            if index in (fault.error_after, fault.eof_after, fault.stall_after):
                break
            if index and self.chunk_delay:
                steps.append(_Sleep(self.chunk_delay))
            if self.hold is not None and index == self.hold[0]:
                steps.append(_Wait(self.hold[1]))
            extra = {"from_variable_selector": ["llm", "text"]} if chatflow else {}
            steps.append(event(delta_event, id=message_id, answer=chunk, **extra))
            if fault.tts:
                steps.append(event("tts_message", audio=_TTS_CHUNK))
            if fault.unknown_event and index == 0:
                steps.append(event("quantum_entanglement", data={"answer": "不应出现的文字"}))
        if fault.error_after is not None:
            error = {k: v for k, v in common.items() if k != "task_id"}  # error events carry no task_id
            steps.append(
                {"event": "error", **error, "status": fault.error_status, "code": fault.error_code,
                 "message": fault.error_message}
            )  # fmt: skip
            return steps
        if fault.eof_after is not None:
            return steps
        if fault.stall_after is not None:
            return [*steps, _Sleep(self.hang_limit)]
        if agent:
            steps.append(_thought(common, position=2, thought=text, tool="", observation=""))
        end_files: list[dict[str, Any]] = []
        for file_type, url in fault.files:
            file_event = {"id": str(uuid.uuid4()), "type": file_type, "belongs_to": "assistant", "url": url}
            if fault.files_in_message_end:
                end_files.append(file_event)
            else:
                steps.append(event("message_file", **file_event))
        # New Agent closes with one `message` repeating the full answer (docs/dify.md §3.3)
        if self.mode == "agent":
            steps.append(event("message", id=message_id, answer=text))
        if fault.replace_with is not None:
            steps.append(event("message_replace", answer=fault.replace_with, reason="moderation"))
        if chatflow:
            steps.append(
                node("node_finished", "llm", "llm", index=2, status="succeeded", outputs={"text": text})
            )
            steps.append(node("node_started", "answer", "answer", index=3))
            steps.append(node("node_finished", "answer", "answer", index=3, status="succeeded"))
        steps.append(_Call(remember))
        steps.append(
            event(
                "message_end",
                id=message_id,
                metadata={"usage": _USAGE, "retriever_resources": []},
                files=end_files or None,
            )
        )
        if chatflow:
            steps.append(
                workflow("workflow_finished", status="succeeded", outputs={"answer": text}, error=None)
            )
        if fault.tts:
            steps.append(event("tts_message_end", audio=""))
        if fault.keep_open_after_end:
            steps.append(_Sleep(self.hang_limit))
        if fault.pings_between:
            steps = [
                item for step in steps for item in ((_Ping(), step) if isinstance(step, Mapping) else (step,))
            ]
        return steps

    def _answering(self, change: int) -> None:
        self.answering += change
        self.peak_answering = max(self.peak_answering, self.answering)

    def _stream(self, steps: list[_Step], *, counted: bool = False) -> StreamingResponse:
        return StreamingResponse(
            self._sse(steps, counted=counted), media_type=_EVENT_STREAM, headers={"X-Version": "1.99.0-fake"}
        )

    async def _sse(self, steps: list[_Step], *, counted: bool = False) -> AsyncIterator[bytes]:
        self.active_streams += 1
        done = False
        try:
            last_ping = anyio.current_time()
            for step in steps:
                if isinstance(step, _Call):
                    step.action()
                elif isinstance(step, _Wait):
                    give_up = anyio.current_time() + self.hang_limit
                    while not step.until() and anyio.current_time() < give_up:
                        await anyio.sleep(0.005)
                elif isinstance(step, _Ping):
                    self.pings_sent += 1
                    yield PING
                elif isinstance(step, _Sleep):
                    # Dify pings every 10 s while the app runs (docs/dify.md §3.1): pings fill every wait.
                    end = anyio.current_time() + step.seconds
                    while (now := anyio.current_time()) < end:
                        if now >= last_ping + self.ping_interval:
                            self.pings_sent += 1
                            last_ping = now
                            yield PING
                        else:
                            await anyio.sleep(min(end, last_ping + self.ping_interval) - now)
                else:
                    yield b"data: " + json.dumps(step, ensure_ascii=False).encode() + b"\n\n"
            done = True
        finally:
            self.active_streams -= 1
            if counted and not done:  # the client went away mid-answer: the app stops working on it
                self._answering(-1)


class FakeDifyHost:
    """An ASGI app forwarding to a swappable FakeDifyServer, so one served port can outlive one test."""

    def __init__(self, server: FakeDifyServer | None = None) -> None:
        self.server = server or FakeDifyServer()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.server.app(scope, receive, send)


_USAGE = {
    "prompt_tokens": 10,
    "completion_tokens": 5,
    "total_tokens": 15,
    "total_price": "0.0000150",
    "currency": "USD",
    "latency": 0.01,
}


def _thought(
    common: Mapping[str, Any], *, position: int, thought: str, tool: str, observation: str
) -> dict[str, Any]:
    return {
        "event": "agent_thought",
        **common,
        "id": str(uuid.uuid4()),
        "position": position,
        "thought": thought,
        "observation": observation,
        "tool": tool,
        "tool_labels": {},
        "tool_input": "",
        "message_files": [],
    }


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message, "status": status}, status_code=status)


def _raw(
    status: int, body: Any, content_type: str | None, headers: Mapping[str, str] | None = None
) -> Response:
    extra = dict(headers or {})
    if isinstance(body, str | bytes):
        return Response(body, status_code=status, media_type=content_type or "text/html", headers=extra)
    return Response(
        json.dumps(body, ensure_ascii=False),
        status_code=status,
        media_type=content_type or "application/json",
        headers=extra,
    )


def _form_fields(parts: Sequence[Part]) -> dict[str, Any]:
    """A multipart body as the schema sees it: file parts as (binary) strings, text fields as text."""
    return {p.name: (p.text if p.filename is None else "<binary>") for p in parts}


# "ID3" and a few zero bytes, base64: an MP3 chunk as tts_message carries it.
_TTS_CHUNK = "SUQzBAAAAAAAAA=="


def _pause_events(event: Callable[..., dict[str, Any]], run_id: str, title: str) -> list[_Step]:
    """A Human Input node reached: human_input_required, then workflow_paused (the stream ends)."""
    return [
        event(
            "human_input_required",
            workflow_run_id=run_id,
            data={
                "form_id": str(uuid.uuid4()),
                "node_id": "human_input",
                "node_title": title,
                "form_content": "请确认退款金额：{{#amount#}}",
                "inputs": [{"type": "paragraph", "output_variable_name": "note", "default": None}],
                "actions": [{"id": "approve", "title": "同意", "button_style": "primary"}],
                "display_in_ui": True,
                "form_token": "tok-1",
                "resolved_default_values": {},
                "expiration_time": int(time.time()) + 86400,
            },
        ),
        event(
            "workflow_paused",
            workflow_run_id=run_id,
            data={
                "workflow_run_id": run_id,
                "paused_nodes": ["human_input"],
                "outputs": {},
                "reasons": [{"type": "human_input_required", "node_id": "human_input"}],
                "status": "paused",
                "created_at": int(time.time()),
                "elapsed_time": 0.5,
                "total_tokens": 0,
                "total_steps": 3,
            },
        ),
    ]


def _progress_events(
    node: Callable[..., dict[str, Any]], event: Callable[..., dict[str, Any]], run_id: str
) -> list[_Step]:
    """What an iteration, a loop, a retried node and an Agent node report on their way (informational)."""
    return [
        node("node_retry", "http", "http-request", index=2, status="retry", error="timeout", retry_index=1),
        node("iteration_started", "iter", "iteration", metadata={"iterator_length": 2}, inputs={}),
        node("iteration_next", "iter", "iteration", index=1),
        node("iteration_completed", "iter", "iteration", outputs={}, status="succeeded", steps=2),
        node("loop_started", "loop", "loop", metadata={"loop_length": 1}, inputs={}),
        node("loop_next", "loop", "loop", index=1),
        node("loop_completed", "loop", "loop", outputs={}, status="succeeded", steps=1),
        event(
            "agent_log",
            data={
                "node_execution_id": str(uuid.uuid4()),
                "id": str(uuid.uuid4()),
                "label": "ROUND 1",
                "parent_id": None,
                "error": None,
                "status": "success",
                "data": {},
                "metadata": {},
                "node_id": "agent",
            },
        ),
    ]


def _is_uuid(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _detected(extension: str) -> str:
    if extension in _IMAGE_EXTS:
        return "image"
    if extension in _DOCUMENT_EXTS:
        return "document"
    if extension in _AUDIO_EXTS:
        return "audio"
    if extension in _VIDEO_EXTS:
        return "video"
    return "custom"


def _looks_like(content_type: str, data: bytes) -> bool:
    """Whether the bytes are audio of the declared type (what a speech model would find out)."""
    kind = content_type.lower()
    if kind == "audio/wav":
        return data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    if kind == "audio/mp3":
        return data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)
    if kind == "audio/amr":
        return False  # Dify's gate accepts AMR, the speech model does not (docs/dify.md §6)
    return bool(data)


def _is_file_reference(value: object) -> bool:
    if not isinstance(value, dict) or not value.get("type"):
        return False
    if value.get("transfer_method") == "local_file":
        return _is_uuid(value.get("upload_file_id"))
    return value.get("transfer_method") == "remote_url" and bool(value.get("url"))
