"""DifyChatEngine: the ChatEngine port over Dify's service API (docs/dify.md)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import httpx

from adapters.outbound.dify_errors import (
    BlockingRefused,
    DifyErrors,
    as_text,
    json_object,
    refuses_blocking,
)
from adapters.outbound.dify_stream import ChatResponse, is_event_stream, read_answer_stream, read_capped
from adapters.outbound.file_fetch import AnswerFileFetcher
from adapters.outbound.http_transport import async_client, direct_transport, json_body
from application.errors import ChatEngineError
from application.ports import AnswerProgress
from domain.app_form import parse_input_form
from domain.chat import Answer, AppInfo, AppParameters, Question
from domain.media import MediaBlob, UploadedFile, extension_of

log = logging.getLogger(__name__)

_TRACE_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# The config key an operator changes when a blocking-mode request is refused (Agent apps only stream).
_RESPONSE_MODE_SETTING = "[CONFIG] DIFY_RESPONSE_MODE"
# Ids this adapter puts into URL paths (message and conversation ids are UUIDs; docs/dify.md).
_PATH_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
_MAX_CACHED_URLS = 32
_USER_AGENT = "kf-dify"


class DifyChatEngine:
    """Asks one Dify chat app (chat, agent-chat, advanced-chat or agent) through its app API key."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        response_mode: str = "streaming",
        connect_timeout: float = 10,
        read_timeout: float = 60,
        idle_timeout: float = 45,
        total_timeout: float = 180,
        max_connections: int = 100,
        client: httpx.AsyncClient | None = None,
        file_hosts: Sequence[str] = (),
        file_client: httpx.AsyncClient | None = None,
    ) -> None:
        """`file_hosts`: hosts (`host` or `host:port`) besides Dify's own origin that answer files may be
        downloaded from (adapters/outbound/file_fetch.py); `file_client` replaces the downloads' guarded
        client (tests only: it skips the address check)."""
        if response_mode not in ("streaming", "blocking"):
            raise ValueError(f"response_mode must be 'streaming' or 'blocking', not {response_mode!r}")
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._errors = DifyErrors(api_key)
        self._response_mode = response_mode
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle_timeout = idle_timeout
        self._total_timeout = total_timeout
        self._owns_client = client is None
        self._urls: dict[str, httpx.URL] = {}
        # Per request, by "is it a stream": a stream's read timer is the idle timeout (pings arrive every
        # 10 s, so it fires only when the server is silent); everything else waits read_timeout.
        self._timeouts = {
            streaming: httpx.Timeout(connect=connect_timeout, read=read, write=read, pool=connect_timeout)
            for streaming, read in ((True, idle_timeout), (False, read_timeout))
        }
        # httpx defaults to 5 s for everything (docs/dify.md §0 #9); every request below passes explicit
        # timeouts.
        self._client = client or async_client(
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            headers={"User-Agent": _USER_AGENT},
            # A streaming answer holds its connection for the whole answer: the pool must be at least as
            # large as the number of answers allowed at once, or questions queue behind httpx's default 100.
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=min(max_connections, 100)
            ),
        )
        # The aiohttp transport behind our own client (None for an injected or proxied one); the headers
        # httpx would add from the client's defaults, for requests sent past httpx.
        self._direct = direct_transport(self._client)
        self._fixed_headers = (("User-Agent", _USER_AGENT), ("Content-Type", "application/json"))
        self._timeout_maps = {streaming: timeout.as_dict() for streaming, timeout in self._timeouts.items()}
        # Answer files: their own small pool and their own rules (origin allowlist, address check).
        self._files = AnswerFileFetcher(
            dify_base_url=self._base_url,
            file_hosts=file_hosts,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            total_timeout=min(total_timeout, 60.0),
            client=file_client,
        )

    @property
    def file_hosts(self) -> frozenset[tuple[str, int | None]]:
        """Hosts besides Dify's own origin that answer files may come from."""
        return self._files.hosts

    async def aclose(self) -> None:
        await self._files.aclose()
        if self._owns_client:
            await self._client.aclose()

    # --- the port ---------------------------------------------------------------------------------------

    async def ask(self, question: Question, progress: AnswerProgress | None = None) -> Answer:
        streaming = self._response_mode == "streaming"
        try:
            return await self._ask(question, progress, streaming=streaming)
        except BlockingRefused as refused:
            # The app only streams (Agent, New Agent): ask again at once in streaming mode, and keep doing so
            # for this app. The customer notices nothing; the operator is told once which setting is wrong.
            if self._response_mode == "blocking":
                self._response_mode = "streaming"
                log.warning(
                    "Dify refused blocking mode (%s: %s): this app only streams. Streaming from now on; "
                    "set %s = streaming",
                    refused.code,
                    refused.message,
                    _RESPONSE_MODE_SETTING,
                )
            return await self._ask(question, progress, streaming=True)

    async def _ask(self, question: Question, progress: AnswerProgress | None, *, streaming: bool) -> Answer:
        try:
            with anyio.fail_after(self._total_timeout):
                async with self._post_chat(question, streaming=streaming) as response:
                    if not response.is_success:
                        body = await read_capped(response)
                        error = self._errors.http_error(
                            response.status_code,
                            body,
                            response.reason_phrase,
                            had_conversation=bool(question.conversation_id),
                            retry_after=response.headers.get("retry-after"),
                        )
                        if not streaming and refuses_blocking(error):
                            raise BlockingRefused(error.code, error.message, status=error.status)
                        raise error
                    if progress is not None:
                        progress.accepted()
                    # Dify 1.13.0 answers some blocking requests with SSE (docs/dify.md §8.3 #32351): trust
                    # the Content-Type, not the mode that was asked for.
                    if is_event_stream(response):
                        return await read_answer_stream(
                            response,
                            question,
                            progress,
                            base_url=self._base_url,
                            idle_timeout=self._idle_timeout,
                            errors=self._errors,
                        )
                    answer = self._blocking_answer(await response.aread(), response.status_code, question)
                    if progress is not None and answer.text:
                        progress.streamed(answer.text)
                    return answer
        except TimeoutError:
            raise ChatEngineError(
                "timeout", f"no answer within {self._total_timeout:g} s", retryable=True
            ) from None
        except httpx.HTTPError as exc:
            raise self._errors.transport_error(exc, "POST /chat-messages") from exc

    async def info(self) -> AppInfo:
        body = await self._get_json("/info")
        return AppInfo(name=as_text(body.get("name")), mode=as_text(body.get("mode")))

    async def parameters(self) -> AppParameters:
        body = await self._get_json("/parameters")
        speech = body.get("speech_to_text")
        file_upload = body.get("file_upload")
        system = body.get("system_parameters")
        limits: Mapping[str, Any] = system if isinstance(system, Mapping) else {}
        questions = body.get("suggested_questions")
        return AppParameters(
            opening_statement=as_text(body.get("opening_statement")),
            suggested_questions=tuple(q for q in questions if isinstance(q, str))
            if isinstance(questions, list)
            else (),
            speech_to_text=isinstance(speech, Mapping) and bool(speech.get("enabled")),
            file_upload=dict(file_upload) if isinstance(file_upload, Mapping) else {},
            file_size_limit_mb=_int(limits.get("file_size_limit")),
            image_file_size_limit_mb=_int(limits.get("image_file_size_limit")),
            audio_file_size_limit_mb=_int(limits.get("audio_file_size_limit")),
            moderation_enabled=_enabled(body.get("sensitive_word_avoidance")),
            suggestions_after_answer=_enabled(body.get("suggested_questions_after_answer")),
            input_form=parse_input_form(body.get("user_input_form")),
        )

    @property
    def streams_answers(self) -> bool:
        return self._response_mode == "streaming"

    async def suggested(self, user: str, message_id: str) -> list[str]:
        # docs/dify.md: `{"result": "success", "data": [...]}`; an error when the feature is off.
        if not _MESSAGE_ID.fullmatch(message_id):
            raise ChatEngineError("invalid_param", "not a message id")
        path = f"/messages/{message_id}/suggested"
        try:
            body = await self._request_json(
                "GET", path, what="GET /messages/{id}/suggested", params={"user": user}
            )
        finally:
            self._urls.pop(path, None)  # one URL per message: not worth keeping parsed
        data = body.get("data")
        if not isinstance(data, list):
            raise ChatEngineError("bad_response", "suggested questions answer without data")
        return [q for q in data if isinstance(q, str)]

    async def upload_file(self, user: str, filename: str, content_type: str, data: bytes) -> UploadedFile:
        # The part's Content-Type is always explicit: without one Dify answers 415 (docs/dify.md §5.1).
        body = await self._post_multipart(
            "/files/upload", file=(filename, data, content_type), user=user, what="POST /files/upload"
        )
        file_id = as_text(body.get("id"))
        if not file_id:
            raise ChatEngineError("bad_response", "upload answer without id")
        return UploadedFile(
            id=file_id,
            name=as_text(body.get("name")) or filename,
            size=_int(body.get("size")) or len(data),
            extension=as_text(body.get("extension")) or extension_of(filename),
            mime_type=as_text(body.get("mime_type")) or content_type,
        )

    async def transcribe(self, user: str, audio: bytes, content_type: str) -> str:
        # Dify checks the part's Content-Type, not the file name (docs/dify.md §6): audio/mp3 or audio/wav,
        # never a guessed audio/mpeg or audio/x-wav.
        extension = content_type.split("/", 1)[-1].split(";", 1)[0].strip() or "wav"
        body = await self._post_multipart(
            "/audio-to-text",
            file=(f"voice.{extension}", audio, content_type),
            user=user,
            what="POST /audio-to-text",
        )
        text = body.get("text")
        if not isinstance(text, str):
            raise ChatEngineError("bad_response", "audio-to-text answer without text")
        return text

    async def fetch_file(self, url: str, *, max_bytes: int) -> MediaBlob:
        # Only from Dify's origin and the listed file hosts, never with the app key (file_fetch.py).
        return await self._files.fetch(url, max_bytes=max_bytes)

    async def give_feedback(self, message_id: str, *, user: str, rating: str, content: str) -> None:
        # docs/dify.md: {"rating": "like"|"dislike"|null, "user", "content"}; the id goes into the path.
        path = f"/messages/{_path_id(message_id)}/feedbacks"
        body = {"rating": rating, "user": user, "content": content}
        await self._request_json("POST", path, what="POST /messages/{id}/feedbacks", json=body)

    async def name_conversation(self, conversation_id: str, *, user: str, name: str) -> None:
        # docs/dify.md: {"name", "auto_generate": false, "user"}.
        path = f"/conversations/{_path_id(conversation_id)}/name"
        body = {"name": name, "auto_generate": False, "user": user}
        await self._request_json("POST", path, what="POST /conversations/{id}/name", json=body)

    # --- request building -------------------------------------------------------------------------------

    def _url(self, path: str) -> httpx.URL:
        # Absolute URLs so an injected client with its own base_url cannot redirect us elsewhere; parsed once
        # per path (httpx spends ~50 us parsing a string URL on every request).
        url = self._urls.get(path)
        if url is None:
            url = httpx.URL(f"{self._base_url}{path}")
            if len(self._urls) < _MAX_CACHED_URLS:  # paths with ids (feedback, names) would grow it forever
                self._urls[path] = url
        return url

    def _post_chat(self, question: Question, *, streaming: bool) -> AbstractAsyncContextManager[ChatResponse]:
        """POST /chat-messages, its answer read as it arrives. Streaming: pings arrive every 10 s, so the
        read timer only fires when the server is silent; the idle guard in read_answer_stream is what
        catches ping-only hangs."""
        payload = self._chat_payload(question, streaming=streaming)
        headers = self._headers(question.trace_id)
        if self._direct is not None:
            # Straight through the aiohttp session, without httpx's objects: ~0.1 ms of CPU per answer.
            return self._direct.stream(
                "POST",
                self._url("/chat-messages"),
                body=json_body(payload),
                headers=(*self._fixed_headers, *headers.items()),
                timeout=self._timeout_maps[streaming],
            )
        return self._client.stream(
            "POST",
            self._url("/chat-messages"),
            json=payload,
            headers=headers,
            timeout=self._timeouts[streaming],
        )

    def _headers(self, trace_id: str = "") -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._api_key}"}
        # Dify accepts X-Trace-Id of 1-128 chars from [A-Za-z0-9_-] (docs/dify.md §1).
        safe = _TRACE_ID_UNSAFE.sub("", trace_id)[:128]
        if safe:
            headers["X-Trace-Id"] = safe
        return headers

    def _chat_payload(self, question: Question, *, streaming: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "query": question.query,
            "inputs": dict(question.inputs),  # required by Dify, even when empty (docs/dify.md §2.1)
            "user": question.user,
            "response_mode": "streaming" if streaming else "blocking",
        }
        if question.conversation_id:  # omitted and "" both start a new conversation (docs/dify.md §2.1)
            payload["conversation_id"] = question.conversation_id
        if question.files:
            payload["files"] = [
                {"type": f.kind, "transfer_method": "local_file", "upload_file_id": f.upload_file_id}
                for f in question.files
            ]
        return payload

    async def _get_json(self, path: str) -> Mapping[str, Any]:
        return await self._request_json("GET", path, what=f"GET {path}")

    async def _post_multipart(
        self, path: str, *, file: tuple[str, bytes, str], user: str, what: str
    ) -> Mapping[str, Any]:
        return await self._request_json("POST", path, what=what, files={"file": file}, data={"user": user})

    async def _request_json(self, method: str, path: str, *, what: str, **send: Any) -> Mapping[str, Any]:
        """One non-streaming call answered by a JSON object; Dify's failures become ChatEngineError."""
        timeout = self._timeouts[False]
        try:
            with anyio.fail_after(self._total_timeout):
                response = await self._client.request(
                    method, self._url(path), headers=self._headers(), timeout=timeout, **send
                )
        except TimeoutError:
            raise ChatEngineError(
                "timeout", f"{what}: no answer within {self._total_timeout:g} s", retryable=True
            ) from None
        except httpx.HTTPError as exc:
            raise self._errors.transport_error(exc, what) from exc
        if not response.is_success:
            raise self._errors.http_error(
                response.status_code,
                response.content,
                response.reason_phrase,
                had_conversation=False,
                retry_after=response.headers.get("retry-after"),
            )
        body = json_object(response.content)
        if body is None:
            raise ChatEngineError(
                "bad_response", f"{what}: body is not a JSON object", status=response.status_code
            )
        return body

    # --- answers ----------------------------------------------------------------------------------------

    def _blocking_answer(self, raw: bytes, status: int, question: Question) -> Answer:
        body = json_object(raw)
        if body is None or not isinstance(body.get("answer"), str):
            raise ChatEngineError("bad_response", "blocking answer is not the expected JSON", status=status)
        conversation_id = as_text(body.get("conversation_id")) or question.conversation_id
        if not conversation_id:
            raise ChatEngineError("bad_response", "blocking answer has no conversation_id", status=status)
        return Answer(
            text=body["answer"],
            conversation_id=conversation_id,
            message_id=as_text(body.get("message_id")) or as_text(body.get("id")),
        )


def _path_id(value: str) -> str:
    """A Dify id (a UUID) placed in a URL path: anything else is refused before it is sent."""
    if not _PATH_ID.fullmatch(value):
        raise ChatEngineError("invalid_param", "not a Dify id", status=400)
    return value


def _int(value: object) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, float | str):
        try:
            return int(float(value))
        except ValueError:
            return 0
    return 0


_MESSAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _enabled(feature: object) -> bool:
    """A `/parameters` feature switch (`{"enabled": true, ...}`)."""
    return isinstance(feature, Mapping) and feature.get("enabled") is True
