"""How Dify's failures become ChatEngineError: error envelopes, stream `error` events, transport failures,
Retry-After, and the scrubbing of outside text (docs/dify.md, errors)."""

from __future__ import annotations

import email.utils
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import httpx

from adapters.outbound.outside_text import escape_outside_text
from application.errors import ChatEngineError, ConversationGone

MAX_ERROR_BODY = 64 * 1024
_MAX_MESSAGE_CHARS = 500
# Transient by nature (docs/dify.md, errors); status-based rules (5xx, 429) are applied on top. Both 429
# codes are retryable: `too_many_requests` is the app's concurrency ceiling, `rate_limit_error` a plan or
# provider quota; how soon to ask again is the caller's business (`retry_after_s` when Dify names it).
_RETRYABLE_CODES = frozenset(
    {"too_many_requests", "rate_limit_error", "completion_request_error", "internal_server_error"}
)
# A Retry-After beyond this is capped: it comes from outside, and nothing waits for an hour anyway.
_MAX_RETRY_AFTER_S = 3600.0


class DifyErrors:
    """Classifies one Dify app's failures; knows the app key only to keep it out of every message."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def http_error(
        self, status: int, body: bytes, reason: str, *, had_conversation: bool, retry_after: str | None = None
    ) -> ChatEngineError:
        envelope = json_object(body)
        code = as_text(envelope.get("code")) if envelope is not None else ""
        message = as_text(envelope.get("message")) if envelope is not None else ""
        delay = retry_after_seconds(retry_after)
        if not code:
            # Gateway pages (502/504 HTML, Cloudflare 524, nginx 413) carry no envelope (docs/dify.md §4.1).
            return self.classify(
                f"http_{status}", message or f"HTTP {status} {reason}".strip(), status, False, delay
            )
        return self.classify(code, message, status, had_conversation, delay)

    def stream_error(self, event: Mapping[str, Any], had_conversation: bool) -> ChatEngineError:
        status = event.get("status")
        return self.classify(
            as_text(event.get("code")) or "stream_error",
            as_text(event.get("message")),
            status if isinstance(status, int) else None,
            had_conversation,
        )

    def classify(
        self,
        code: str,
        message: str,
        status: int | None,
        had_conversation: bool,
        retry_after_s: float | None = None,
    ) -> ChatEngineError:
        message = self.scrub(message)
        code = escape_outside_text(code, 80)
        # docs/dify.md §4.2: these three mean "drop the stored id and ask again without it". The
        # Conversation Not Exists message may carry a Flask suffix (#28481), hence the prefix match.
        if code == "not_found" and message.lower().startswith("conversation not exists"):
            return ConversationGone(message, status=status)
        if code == "conversation_completed":
            return ConversationGone(message, status=status)
        if code == "invalid_param" and had_conversation and blames_conversation_id(message):
            return ConversationGone(message, status=status)
        retryable = code in _RETRYABLE_CODES or (status is not None and (status >= 500 or status == 429))
        return ChatEngineError(code, message, status=status, retryable=retryable, retry_after_s=retry_after_s)

    def transport_error(self, exc: httpx.HTTPError, what: str) -> ChatEngineError:
        detail = self.scrub(f"{what}: {type(exc).__name__}: {exc}")[:_MAX_MESSAGE_CHARS]
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return ChatEngineError("unreachable", detail, retryable=True)
        if isinstance(exc, httpx.TimeoutException):
            return ChatEngineError("timeout", detail, retryable=True)
        if isinstance(exc, httpx.DecodingError):
            return ChatEngineError("bad_response", detail, retryable=False)
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
            return ChatEngineError("unreachable", detail, retryable=False)  # misconfigured base_url
        return ChatEngineError("unreachable", detail, retryable=True)

    def scrub(self, text: str) -> str:
        """Outside text for an exception or log line: bounded, no API key, control characters escaped."""
        text = text[:_MAX_MESSAGE_CHARS]
        text = text.replace(self._api_key, "***") if self._api_key else text
        return escape_outside_text(text, _MAX_MESSAGE_CHARS)


class BlockingRefused(ChatEngineError):
    """Dify refused a blocking-mode request because the app only streams (ask() retries it streaming)."""


def refuses_blocking(error: ChatEngineError) -> bool:
    # Agent: 400 invalid_param "Agent Chat App does not support blocking mode"; New Agent: 400 bad_request
    # "Agent App only supports streaming response mode." (docs/dify.md, errors).
    text = error.message.lower()
    return (
        error.status == 400
        and error.code in ("invalid_param", "bad_request")
        and ("blocking mode" in text or "only supports streaming" in text)
    )


def retry_after_seconds(value: str | None) -> float | None:
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


def json_object(raw: bytes) -> Mapping[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def blames_conversation_id(message: str) -> bool:
    # "conversation_id must be a valid UUID" (newest), or a pydantic "Input should be a valid UUID" about it;
    # a bad upload_file_id also says "valid UUID", so file complaints are excluded.
    if "conversation_id" in message:
        return True
    return "valid uuid" in message.lower() and "file" not in message.lower()


def as_text(value: object) -> str:
    return value if isinstance(value, str) else ""
