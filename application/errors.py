"""Errors the ports raise, in the application's words. Adapters translate vendor failures into these."""

from __future__ import annotations


class StoreUnavailable(Exception):
    """The shared state store cannot be reached (or answered too slowly)."""


class ChatEngineError(Exception):
    """Dify failed to answer.

    `code` is Dify's error code (`completion_request_error`, `too_many_requests`, ...) or one of ours:
    `timeout`, `unreachable`, `bad_response`, `http_<status>`, `stream_incomplete`, `idle_timeout`.
    `retryable` says whether asking again could help (429, 5xx, transient model errors, timeouts).
    `status` is the HTTP status Dify answered with (None for transport failures); `retry_after_s` the delay
    Dify (or its gateway) asked for in a Retry-After header, in seconds, None when it named none.
    """

    def __init__(
        self,
        code: str,
        message: str = "",
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
    ):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class ConversationGone(ChatEngineError):
    """The conversation id is unknown, ended or malformed: drop it and ask again in a new conversation."""

    def __init__(self, message: str = "", *, status: int | None = None):
        super().__init__("conversation_gone", message, status=status, retryable=False)


class WeComError(Exception):
    """The WeCom API answered with a non-zero errcode, or could not be reached.

    `errcode` is WeCom's errcode; -1 is WeCom's "system busy". Transport failures use `errcode=None`.
    """

    def __init__(self, errcode: int | None, errmsg: str = "", *, api: str = ""):
        where = f" ({api})" if api else ""
        super().__init__(f"WeCom errcode {errcode}{where}: {errmsg}")
        self.errcode = errcode
        self.errmsg = errmsg
        self.api = api

    # Errcodes that mean the deployment is misconfigured: retrying cannot help, the operator must act.
    CONFIG_ERRCODES = frozenset({40001, 40013, 40091, 41004, 60020, 48002, 95011, 95012, 95017})
    TOKEN_ERRCODES = frozenset({40014, 42001})
    # A human servicer owns the session (or it is outside the 48 h window): the bot must stay quiet.
    SESSION_NOT_SENDABLE = 95018

    @property
    def is_config_error(self) -> bool:
        return self.errcode in self.CONFIG_ERRCODES

    @property
    def is_transient(self) -> bool:
        """Busy, rate-limited or unreachable: a later attempt may succeed."""
        return self.errcode is None or self.errcode in (-1, 45009, 45033)


class MediaTooLarge(Exception):
    """Media is bigger than the caller allowed (a download cap) or than the receiving side accepts."""

    def __init__(self, limit_bytes: int, size: int | None = None, *, what: str = "media") -> None:
        seen = f" ({size} bytes)" if size is not None else ""
        super().__init__(f"{what} larger than {limit_bytes} bytes{seen}")
        self.limit_bytes = limit_bytes
        self.size = size


class AudioConversionError(Exception):
    """Voice could not be turned into audio speech to text takes (no converter, bad input, timeout)."""
