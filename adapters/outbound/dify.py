"""DifyChatEngine: the ChatEngine port over Dify's service API (docs/dify.md)."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urljoin

import anyio
import httpx

from adapters.outbound.file_fetch import AnswerFileFetcher
from adapters.outbound.http_transport import async_client
from adapters.outbound.outside_text import escape_outside_text
from application.errors import ChatEngineError, ConversationGone
from application.ports import AnswerProgress
from domain.app_form import parse_input_form
from domain.chat import Answer, AnswerFile, AppInfo, AppParameters, Question
from domain.media import MediaBlob, UploadedFile, extension_of

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_TRACE_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MAX_ERROR_BODY = 64 * 1024
_MAX_MESSAGE_CHARS = 500
# Dify follows a failed `workflow_finished` with the `error` event that explains it (docs/dify.md §3.3); wait
# this long for it so the application gets Dify's code, not just "workflow_failed".
_FAILED_WORKFLOW_GRACE_S = 2.0
# After message_end, how long to read the rest of a stream so its connection can be reused.
_TAIL_READ_S = 0.1
# Transient by nature (docs/dify.md, errors); status-based rules (5xx, 429) are applied on top. Both 429
# codes are retryable: `too_many_requests` is the app's concurrency ceiling, `rate_limit_error` a plan or
# provider quota; how soon to ask again is the caller's business (`retry_after_s` when Dify names it).
_RETRYABLE_CODES = frozenset(
    {"too_many_requests", "rate_limit_error", "completion_request_error", "internal_server_error"}
)
# A Retry-After beyond this is capped: it comes from outside, and nothing waits for an hour anyway.
_MAX_RETRY_AFTER_S = 3600.0
# The config key an operator changes when a blocking-mode request is refused (Agent apps only stream).
_RESPONSE_MODE_SETTING = "[CONFIG] DIFY_RESPONSE_MODE"
# Events that carry nothing for the customer, read on purpose and ignored (docs/dify.md, streaming):
# reasoning (`reasoning_chunk`, agent thoughts and logs), speech, workflow progress, workflow-app text and
# form bookkeeping. Any other unknown event (a newer Dify) is ignored as well, and logged at DEBUG.
_INFORMATIONAL_EVENTS = frozenset(
    {
        "reasoning_chunk",
        "agent_thought",
        "agent_log",
        "tts_message",
        "tts_message_end",
        "workflow_started",
        "node_started",
        "node_finished",
        "node_retry",
        "iteration_started",
        "iteration_next",
        "iteration_completed",
        "loop_started",
        "loop_next",
        "loop_completed",
        "text_chunk",
        "human_input_form_filled",
        "human_input_form_timeout",
    }
)
# A Human Input node paused the chatflow: the stream ends, the run waits for a form nobody here can fill.
_PAUSE_EVENTS = frozenset({"human_input_required", "workflow_paused"})
_MAX_NODE_NAME = 100
# Ids this adapter puts into URL paths (message and conversation ids are UUIDs; docs/dify.md).
_PATH_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
_MAX_CACHED_URLS = 32


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
            headers={"User-Agent": "kf-dify"},
            # A streaming answer holds its connection for the whole answer: the pool must be at least as
            # large as the number of answers allowed at once, or questions queue behind httpx's default 100.
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=min(max_connections, 100)
            ),
        )
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
        except _BlockingRefused as refused:
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
        # Streaming: pings arrive every 10 s, so httpx's read timer only fires when the server is silent;
        # the idle guard in _read_stream is what catches ping-only hangs.
        timeout = self._timeouts[streaming]
        try:
            with anyio.fail_after(self._total_timeout):
                async with self._client.stream(
                    "POST",
                    self._url("/chat-messages"),
                    json=self._chat_payload(question, streaming=streaming),
                    headers=self._headers(question.trace_id),
                    timeout=timeout,
                ) as response:
                    if not response.is_success:
                        body = await _read_capped(response)
                        error = self._http_error(
                            response.status_code,
                            body,
                            response.reason_phrase,
                            had_conversation=bool(question.conversation_id),
                            retry_after=response.headers.get("retry-after"),
                        )
                        if not streaming and _refuses_blocking(error):
                            raise _BlockingRefused(error.code, error.message, status=error.status)
                        raise error
                    if progress is not None:
                        progress.accepted()
                    # Dify 1.13.0 answers some blocking requests with SSE (docs/dify.md §8.3 #32351): trust
                    # the Content-Type, not the mode that was asked for.
                    if _is_event_stream(response):
                        return await self._read_stream(response, question, progress)
                    answer = self._blocking_answer(await response.aread(), response.status_code, question)
                    if progress is not None and answer.text:
                        progress.streamed(answer.text)
                    return answer
        except TimeoutError:
            raise ChatEngineError(
                "timeout", f"no answer within {self._total_timeout:g} s", retryable=True
            ) from None
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, "POST /chat-messages") from exc

    async def info(self) -> AppInfo:
        body = await self._get_json("/info")
        return AppInfo(name=_text(body.get("name")), mode=_text(body.get("mode")))

    async def parameters(self) -> AppParameters:
        body = await self._get_json("/parameters")
        speech = body.get("speech_to_text")
        file_upload = body.get("file_upload")
        system = body.get("system_parameters")
        limits: Mapping[str, Any] = system if isinstance(system, Mapping) else {}
        questions = body.get("suggested_questions")
        return AppParameters(
            opening_statement=_text(body.get("opening_statement")),
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
        file_id = _text(body.get("id"))
        if not file_id:
            raise ChatEngineError("bad_response", "upload answer without id")
        return UploadedFile(
            id=file_id,
            name=_text(body.get("name")) or filename,
            size=_int(body.get("size")) or len(data),
            extension=_text(body.get("extension")) or extension_of(filename),
            mime_type=_text(body.get("mime_type")) or content_type,
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
            raise self._transport_error(exc, what) from exc
        if not response.is_success:
            raise self._http_error(
                response.status_code,
                response.content,
                response.reason_phrase,
                had_conversation=False,
                retry_after=response.headers.get("retry-after"),
            )
        body = _json_object(response.content)
        if body is None:
            raise ChatEngineError(
                "bad_response", f"{what}: body is not a JSON object", status=response.status_code
            )
        return body

    # --- answers ----------------------------------------------------------------------------------------

    def _blocking_answer(self, raw: bytes, status: int, question: Question) -> Answer:
        body = _json_object(raw)
        if body is None or not isinstance(body.get("answer"), str):
            raise ChatEngineError("bad_response", "blocking answer is not the expected JSON", status=status)
        conversation_id = _text(body.get("conversation_id")) or question.conversation_id
        if not conversation_id:
            raise ChatEngineError("bad_response", "blocking answer has no conversation_id", status=status)
        return Answer(
            text=body["answer"],
            conversation_id=conversation_id,
            message_id=_text(body.get("message_id")) or _text(body.get("id")),
        )

    async def _read_stream(
        self, response: httpx.Response, question: Question, progress: AnswerProgress | None
    ) -> Answer:
        assembly = _AnswerAssembly(self._base_url)
        had_conversation = bool(question.conversation_id)
        saw_content = False
        # Set by a failed workflow_finished: raised unless the explaining `error` event arrives in time.
        pending_failure: ChatEngineError | None = None
        loop = asyncio.get_running_loop()
        # One idle timer for the whole stream, moved on at every content event: a cancel scope per line
        # cost more CPU than the rest of the answer (bench/FINDINGS.md #6).
        idle = asyncio.timeout_at(loop.time() + self._idle_timeout)
        # Re-armed `slack` beyond what progress asks, so a fast stream re-arms it once, not per event; a
        # silence is cut after between idle_timeout and idle_timeout + slack.
        slack = self._idle_timeout / 20
        streamed = ""  # the text `progress` last heard
        try:
            async with idle, _closing(_sse_lines(response)) as batches:
                while True:
                    try:
                        batch = await anext(batches)
                    except StopAsyncIteration:
                        if pending_failure is not None:
                            raise pending_failure from None
                        raise ChatEngineError(
                            "stream_incomplete", "stream ended before message_end", retryable=True
                        ) from None
                    except httpx.ReadTimeout:
                        break  # the server went fully silent: same as the idle guard
                    except httpx.TransportError as exc:
                        raise ChatEngineError(
                            "stream_incomplete", f"stream broke: {type(exc).__name__}", retryable=True
                        ) from exc
                    for line in batch:
                        event = _sse_event(line)
                        if event is None or event.get("event") == "ping":
                            continue  # keep-alives do not count as progress (docs/dify.md §0 #10)
                        kind = event.get("event")
                        if pending_failure is not None:
                            if kind == "error":
                                raise self._stream_error(event, had_conversation)
                            continue
                        saw_content = True
                        due = loop.time() + self._idle_timeout
                        if (idle.when() or 0.0) < due:
                            idle.reschedule(due + slack)
                        if kind == "error":
                            raise self._stream_error(event, had_conversation)
                        assembly.feed(event)
                        if progress is not None and kind in _TEXT_EVENTS and assembly.text != streamed:
                            streamed = assembly.text
                            progress.streamed(streamed)
                        if kind == "message_end" or kind in _PAUSE_EVENTS:
                            # message_end: chatflow then sends workflow_finished, and some versions never
                            # close (Dify #21568): the answer is complete here. A pause (Human Input node:
                            # human_input_required, then workflow_paused, then the stream ends) ends the turn
                            # too: nobody here can fill the form. Read what little follows for a moment, so
                            # that a response that does end returns its connection to the pool (else every
                            # answer opens a new connection: a TLS handshake in production); then let the
                            # context close it.
                            idle.reschedule(None)
                            with contextlib.suppress(TimeoutError, httpx.TransportError):
                                async with asyncio.timeout(_TAIL_READ_S):
                                    async for _ in batches:
                                        pass
                            answer = assembly.answer(question)
                            if answer.needs_human_input:
                                log.warning(
                                    "Dify paused the chatflow for human input at node %r: the turn ends "
                                    "without an answer from the app",
                                    escape_outside_text(answer.needs_human_input),
                                )
                            return answer
                        if kind == "workflow_finished":
                            data = event.get("data")
                            status = data.get("status") if isinstance(data, Mapping) else None
                            if status != "failed":
                                return assembly.answer(question)
                            error = data.get("error") if isinstance(data, Mapping) else None
                            pending_failure = ChatEngineError(
                                "workflow_failed",
                                self._scrub(_text(error)) or "chatflow run failed",
                                retryable=False,
                            )
                            deadline = idle.when()
                            grace = loop.time() + _FAILED_WORKFLOW_GRACE_S
                            idle.reschedule(grace if deadline is None else min(deadline, grace))
        except TimeoutError:
            if not idle.expired():
                raise
        if pending_failure is not None:
            raise pending_failure
        if had_conversation and not saw_content:
            # Heuristic for Dify #38800 (docs/dify.md §8.3): a well-formed but unknown conversation_id makes
            # some 2026 builds stream pings forever instead of answering 404. A ping-only stream on a request
            # that carried a conversation id is therefore reported as ConversationGone, so the application
            # starts a new conversation (once). The cost: a chatflow ping-only hang (#35611) also resets the
            # conversation, and the retry then fails with a plain idle_timeout.
            log.warning(
                "Dify sent only pings for %g s to a request with a conversation id; treating it as gone",
                self._idle_timeout,
            )
            raise ConversationGone(f"no answer event within {self._idle_timeout:g} s (only pings)")
        raise ChatEngineError(
            "idle_timeout", f"no answer event within {self._idle_timeout:g} s", retryable=True
        )

    # --- errors -----------------------------------------------------------------------------------------

    def _http_error(
        self, status: int, body: bytes, reason: str, *, had_conversation: bool, retry_after: str | None = None
    ) -> ChatEngineError:
        envelope = _json_object(body)
        code = _text(envelope.get("code")) if envelope is not None else ""
        message = _text(envelope.get("message")) if envelope is not None else ""
        delay = _retry_after_seconds(retry_after)
        if not code:
            # Gateway pages (502/504 HTML, Cloudflare 524, nginx 413) carry no envelope (docs/dify.md §4.1).
            return self._classify(
                f"http_{status}", message or f"HTTP {status} {reason}".strip(), status, False, delay
            )
        return self._classify(code, message, status, had_conversation, delay)

    def _stream_error(self, event: Mapping[str, Any], had_conversation: bool) -> ChatEngineError:
        status = event.get("status")
        return self._classify(
            _text(event.get("code")) or "stream_error",
            _text(event.get("message")),
            status if isinstance(status, int) else None,
            had_conversation,
        )

    def _classify(
        self,
        code: str,
        message: str,
        status: int | None,
        had_conversation: bool,
        retry_after_s: float | None = None,
    ) -> ChatEngineError:
        message = self._scrub(message)
        code = escape_outside_text(code, 80)
        # Spec §4.2: these three mean "drop the stored id and ask again without it". The Conversation Not
        # Exists message may carry a Flask suffix (#28481), hence the prefix match.
        if code == "not_found" and message.lower().startswith("conversation not exists"):
            return ConversationGone(message, status=status)
        if code == "conversation_completed":
            return ConversationGone(message, status=status)
        if code == "invalid_param" and had_conversation and _blames_conversation_id(message):
            return ConversationGone(message, status=status)
        retryable = code in _RETRYABLE_CODES or (status is not None and (status >= 500 or status == 429))
        return ChatEngineError(code, message, status=status, retryable=retryable, retry_after_s=retry_after_s)

    def _transport_error(self, exc: httpx.HTTPError, what: str) -> ChatEngineError:
        detail = self._scrub(f"{what}: {type(exc).__name__}: {exc}")[:_MAX_MESSAGE_CHARS]
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return ChatEngineError("unreachable", detail, retryable=True)
        if isinstance(exc, httpx.TimeoutException):
            return ChatEngineError("timeout", detail, retryable=True)
        if isinstance(exc, httpx.DecodingError):
            return ChatEngineError("bad_response", detail, retryable=False)
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
            return ChatEngineError("unreachable", detail, retryable=False)  # misconfigured base_url
        return ChatEngineError("unreachable", detail, retryable=True)

    def _scrub(self, text: str) -> str:
        """Outside text for an exception or log line: bounded, no API key, control characters escaped."""
        text = text[:_MAX_MESSAGE_CHARS]
        text = text.replace(self._api_key, "***") if self._api_key else text
        return escape_outside_text(text, _MAX_MESSAGE_CHARS)


class _AnswerAssembly:
    """Builds one answer from stream events (docs/dify.md §3.5)."""

    def __init__(self, base_url: str) -> None:
        self._base_url = base_url + "/"
        self._text = ""  # the answer so far: message/agent_message deltas in arrival order
        self._saw_agent = False  # an `agent_message` arrived: a later `message` may repeat the answer
        self._replaced = False  # output moderation replaced the answer: nothing streamed after counts
        self._files: list[AnswerFile] = []
        self._conversation_id = ""
        self._message_id = ""
        self._paused_at = ""

    def feed(self, event: Mapping[str, Any]) -> None:
        kind = event.get("event")
        self._conversation_id = _text(event.get("conversation_id")) or self._conversation_id
        message_id = _text(event.get("message_id"))
        if not message_id and kind in ("message", "agent_message", "message_end", "message_replace"):
            message_id = _text(event.get("id"))  # `id` of other events is a thought, file or run id
        self._message_id = message_id or self._message_id
        if kind == "message":
            self._add_message(_text(event.get("answer")))
        elif kind == "agent_message":
            if not self._replaced:
                self._saw_agent = True
                self._text += _text(event.get("answer"))
        elif kind == "message_replace":
            # Output moderation: its text is the answer, whatever was streamed before or after.
            self._text = _text(event.get("answer"))
            self._replaced = True
        elif kind in _PAUSE_EVENTS:
            self._paused_at = self._paused_at or _paused_node(event)
        elif kind == "message_file" and event.get("belongs_to", "assistant") == "assistant":
            self._add_file(event)
        elif kind == "message_end" and isinstance(event.get("files"), list):
            # Newer builds repeat the answer's files in message_end (docs/dify.md §3.3); keep each URL once.
            for item in event["files"]:
                if isinstance(item, Mapping) and item.get("belongs_to", "assistant") == "assistant":
                    self._add_file(item)
        elif kind not in _INFORMATIONAL_EVENTS and kind not in _KNOWN_EVENTS:
            log.debug("ignoring unknown Dify stream event %r", escape_outside_text(_text(kind), 40))

    def _add_message(self, delta: str) -> None:
        if self._replaced:
            return
        if self._saw_agent and delta.strip():
            # New Agent closes with one `message` carrying the complete answer it already streamed as
            # `agent_message` deltas (docs/dify.md): a repeat of the text so far is the answer, not more of
            # it. Anything else (an annotation reply sent as `message`) is appended as usual.
            if delta.strip() == self._text.strip():
                return
            if delta.startswith(self._text) or delta.lstrip().startswith(self._text.strip()):
                self._text = delta
                return
        self._text += delta

    def _add_file(self, item: Mapping[str, Any]) -> None:
        url = _text(item.get("url")) or _text(item.get("remote_url"))
        if not url:
            return
        # The URL may be relative to the Dify host (docs/dify.md §3.3, not verified).
        absolute = urljoin(self._base_url, url)
        if all(f.url != absolute for f in self._files):
            self._files.append(AnswerFile(kind=_text(item.get("type")) or "custom", url=absolute))

    @property
    def text(self) -> str:
        return self._text

    def answer(self, question: Question) -> Answer:
        conversation_id = self._conversation_id or question.conversation_id
        if not conversation_id:
            raise ChatEngineError("bad_response", "stream carried no conversation_id")
        return Answer(
            text=self.text,
            conversation_id=conversation_id,
            message_id=self._message_id,
            files=tuple(self._files),
            needs_human_input=self._paused_at,
        )


# Events that can change the answer text.
_TEXT_EVENTS = frozenset({"message", "agent_message", "message_replace"})
_KNOWN_EVENTS = frozenset(
    {"message", "agent_message", "message_replace", "message_file", "message_end", "workflow_finished"}
    | {"error", "ping"}
    | _PAUSE_EVENTS
)


class _BlockingRefused(ChatEngineError):
    """Dify refused a blocking-mode request because the app only streams (ask() retries it streaming)."""


def _refuses_blocking(error: ChatEngineError) -> bool:
    # Agent: 400 invalid_param "Agent Chat App does not support blocking mode"; New Agent: 400 bad_request
    # "Agent App only supports streaming response mode." (docs/dify.md, errors).
    text = error.message.lower()
    return (
        error.status == 400
        and error.code in ("invalid_param", "bad_request")
        and ("blocking mode" in text or "only supports streaming" in text)
    )


def _paused_node(event: Mapping[str, Any]) -> str:
    """What names the node a paused chatflow waits at: human_input_required's node title or id, else the
    first of workflow_paused's paused nodes; never empty, so the pause is always marked."""
    data = event.get("data")
    name = ""
    if isinstance(data, Mapping):
        name = _text(data.get("node_title")).strip() or _text(data.get("node_id")).strip()
        nodes = data.get("paused_nodes")
        if not name and isinstance(nodes, list) and nodes:
            name = _text(nodes[0]).strip()
    return name[:_MAX_NODE_NAME] or "human_input"


def _retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header (delta-seconds or an HTTP date) as seconds from now, in [0, 3600]; None when
    absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER_S)


async def _sse_lines(response: httpx.Response) -> AsyncIterator[list[bytes]]:
    """The body's `data:` lines, a list per chunk received (one await per chunk, not per line, and no text
    decoding: the JSON parser reads UTF-8 bytes). Lines end at LF, CRLF or a lone CR, as SSE allows."""
    rest = b""
    async for chunk in response.aiter_bytes():
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, rest = (rest + chunk).split(b"\n") if rest else chunk.split(b"\n")
        batch = [line for line in lines if line.startswith(b"data:")]
        if batch:
            yield batch
    if rest.startswith(b"data:"):
        yield [rest]


def _sse_event(line: bytes) -> Mapping[str, Any] | None:
    """The JSON of a `data:` line; None when it carries nothing."""
    if not line.startswith(b"data:"):
        return None
    payload = line[5:]
    if payload.startswith(b" "):
        payload = payload[1:]
    if not payload.strip():
        return None
    try:
        event = json.loads(payload)
    except ValueError:
        raise ChatEngineError("bad_response", "stream event is not JSON") from None
    if not isinstance(event, dict):
        raise ChatEngineError("bad_response", "stream event is not a JSON object")
    return event


def _is_event_stream(response: httpx.Response) -> bool:
    content_type: str = response.headers.get("content-type", "")
    return content_type.lower().startswith("text/event-stream")


async def _read_capped(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async with _closing(response.aiter_bytes()) as stream:
        async for chunk in stream:
            chunks.append(chunk)
            size += len(chunk)
            if size >= _MAX_ERROR_BODY:
                break
    return b"".join(chunks)


@contextlib.asynccontextmanager
async def _closing(iterator: AsyncIterator[_T]) -> AsyncIterator[AsyncIterator[_T]]:
    """Close httpx's async generator when we stop early (terminal event), not whenever the GC gets to it."""
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


def _json_object(raw: bytes) -> Mapping[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _blames_conversation_id(message: str) -> bool:
    # "conversation_id must be a valid UUID" (newest), or a pydantic "Input should be a valid UUID" about it;
    # a bad upload_file_id also says "valid UUID", so file complaints are excluded.
    if "conversation_id" in message:
        return True
    return "valid uuid" in message.lower() and "file" not in message.lower()


def _path_id(value: str) -> str:
    """A Dify id (a UUID) placed in a URL path: anything else is refused before it is sent."""
    if not _PATH_ID.fullmatch(value):
        raise ChatEngineError("invalid_param", "not a Dify id", status=400)
    return value


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


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
