"""Reading Dify's answer stream: server-sent events, the idle guard, and the assembly of one answer from the
events (docs/dify.md §3)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol, TypeVar
from urllib.parse import urljoin

import httpx
import orjson

from adapters.outbound.dify_errors import MAX_ERROR_BODY, DifyErrors, as_text
from adapters.outbound.outside_text import escape_outside_text
from application.errors import ChatEngineError, ConversationGone
from application.ports import AnswerProgress
from domain.chat import Answer, AnswerFile, Question

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Dify follows a failed `workflow_finished` with the `error` event that explains it (docs/dify.md §3.3); wait
# this long for it so the application gets Dify's code, not just "workflow_failed".
_FAILED_WORKFLOW_GRACE_S = 2.0
# After message_end, how long to read the rest of a stream so its connection can be reused.
_TAIL_READ_S = 0.1
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


class ChatResponse(Protocol):
    """What the Dify adapter reads of a response: an httpx.Response, or the direct transport's
    StreamedResponse (adapters/outbound/http_transport.py), which keeps httpx's names."""

    @property
    def status_code(self) -> int: ...

    @property
    def reason_phrase(self) -> str: ...

    @property
    def is_success(self) -> bool: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def aiter_bytes(self) -> AsyncIterator[bytes]: ...

    async def aread(self) -> bytes: ...


async def read_answer_stream(
    response: ChatResponse,
    question: Question,
    progress: AnswerProgress | None,
    *,
    base_url: str,
    idle_timeout: float,
    errors: DifyErrors,
) -> Answer:
    """The answer of one streamed chat request; Dify's failures, a broken stream and silence raise
    ChatEngineError (ConversationGone for a stored conversation Dify no longer knows)."""
    assembly = _AnswerAssembly(base_url)
    had_conversation = bool(question.conversation_id)
    saw_content = False
    # Set by a failed workflow_finished: raised unless the explaining `error` event arrives in time.
    pending_failure: ChatEngineError | None = None
    loop = asyncio.get_running_loop()
    # One idle timer for the whole stream, moved on at every content event: a cancel scope per line
    # cost more CPU than the rest of the answer (bench/FINDINGS.md #6).
    idle = asyncio.timeout_at(loop.time() + idle_timeout)
    # Re-armed `slack` beyond what progress asks, so a fast stream re-arms it once, not per event; a
    # silence is cut after between idle_timeout and idle_timeout + slack.
    slack = idle_timeout / 20
    streamed = ""  # the text `progress` last heard
    try:
        async with idle, closing(sse_lines(response)) as batches:
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
                    event = sse_event(line)
                    if event is None or event.get("event") == "ping":
                        continue  # keep-alives do not count as progress (docs/dify.md §0 #10)
                    kind = event.get("event")
                    if pending_failure is not None:
                        if kind == "error":
                            raise errors.stream_error(event, had_conversation)
                        continue
                    saw_content = True
                    due = loop.time() + idle_timeout
                    if (idle.when() or 0.0) < due:
                        idle.reschedule(due + slack)
                    if kind == "error":
                        raise errors.stream_error(event, had_conversation)
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
                            errors.scrub(as_text(error)) or "chatflow run failed",
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
            idle_timeout,
        )
        raise ConversationGone(f"no answer event within {idle_timeout:g} s (only pings)")
    raise ChatEngineError("idle_timeout", f"no answer event within {idle_timeout:g} s", retryable=True)


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
        self._conversation_id = as_text(event.get("conversation_id")) or self._conversation_id
        message_id = as_text(event.get("message_id"))
        if not message_id and kind in ("message", "agent_message", "message_end", "message_replace"):
            message_id = as_text(event.get("id"))  # `id` of other events is a thought, file or run id
        self._message_id = message_id or self._message_id
        if kind == "message":
            self._add_message(as_text(event.get("answer")))
        elif kind == "agent_message":
            if not self._replaced:
                self._saw_agent = True
                self._text += as_text(event.get("answer"))
        elif kind == "message_replace":
            # Output moderation: its text is the answer, whatever was streamed before or after.
            self._text = as_text(event.get("answer"))
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
            log.debug("ignoring unknown Dify stream event %r", escape_outside_text(as_text(kind), 40))

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
        url = as_text(item.get("url")) or as_text(item.get("remote_url"))
        if not url:
            return
        # The URL may be relative to the Dify host (docs/dify.md §3.3, not verified).
        absolute = urljoin(self._base_url, url)
        if all(f.url != absolute for f in self._files):
            self._files.append(AnswerFile(kind=as_text(item.get("type")) or "custom", url=absolute))

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


def _paused_node(event: Mapping[str, Any]) -> str:
    """What names the node a paused chatflow waits at: human_input_required's node title or id, else the
    first of workflow_paused's paused nodes; never empty, so the pause is always marked."""
    data = event.get("data")
    name = ""
    if isinstance(data, Mapping):
        name = as_text(data.get("node_title")).strip() or as_text(data.get("node_id")).strip()
        nodes = data.get("paused_nodes")
        if not name and isinstance(nodes, list) and nodes:
            name = as_text(nodes[0]).strip()
    return name[:_MAX_NODE_NAME] or "human_input"


async def sse_lines(response: ChatResponse) -> AsyncIterator[list[bytes]]:
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


def sse_event(line: bytes) -> Mapping[str, Any] | None:
    """The JSON of a `data:` line; None when it carries nothing."""
    if not line.startswith(b"data:"):
        return None
    payload = line[5:]
    if payload.startswith(b" "):
        payload = payload[1:]
    if not payload.strip():
        return None
    try:
        event = orjson.loads(payload)  # a quarter of json's CPU, on every event of every answer
    except ValueError:
        try:  # what orjson refuses and Python reads: NaN, escaped lone surrogates, integers past 64 bits
            event = json.loads(payload)
        except ValueError:
            raise ChatEngineError("bad_response", "stream event is not JSON") from None
    if not isinstance(event, dict):
        raise ChatEngineError("bad_response", "stream event is not a JSON object")
    return event


def is_event_stream(response: ChatResponse) -> bool:
    content_type: str = response.headers.get("content-type", "")
    return content_type.lower().startswith("text/event-stream")


async def read_capped(response: ChatResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async with closing(response.aiter_bytes()) as stream:
        async for chunk in stream:
            chunks.append(chunk)
            size += len(chunk)
            if size >= MAX_ERROR_BODY:
                break
    return b"".join(chunks)


@contextlib.asynccontextmanager
async def closing(iterator: AsyncIterator[_T]) -> AsyncIterator[AsyncIterator[_T]]:
    """Close httpx's async generator when we stop early (terminal event), not whenever the GC gets to it."""
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
