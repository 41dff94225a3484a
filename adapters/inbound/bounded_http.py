"""uvicorn's HTTP/1.1 protocols with a bound on the request head: at most `max_bytes`, within `timeout_s`.

uvicorn bounds neither with httptools (h11 only in size): a client can stream headers for ever (each one kept
in a list until the head ends) or send half a request line and hold the connection. These subclasses count
the bytes of each request head before the parser sees them and never feed it more than the limit: past it
the client gets 431 and the connection is closed. A timer, armed when the connection opens and whenever a
head is left incomplete by a read, closes the connection (408 if part of a head came) when the head has
not ended in time. Bodies are the application's business (the webhook bounds them itself); idle kept-alive
connections are closed by uvicorn's own `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Final, Literal

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("kfdify.http")

DEFAULT_MAX_HEAD_BYTES: Final = 64 * 1024
DEFAULT_HEAD_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class HeadLimits:
    max_bytes: int = DEFAULT_MAX_HEAD_BYTES  # request line + headers + the blank line
    timeout_s: float = DEFAULT_HEAD_TIMEOUT_S  # from the connection (or a head's first byte) to its end


def _refusal(status: int, reason: str) -> bytes:
    body = reason.encode("ascii")
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode("ascii") + body


TOO_LARGE: Final = _refusal(431, "Request Header Fields Too Large")
TIMED_OUT: Final = _refusal(408, "Request Timeout")


class _HeadBound:
    """Head accounting shared by both parsers; each subclass says when a head starts, is pending, and ends."""

    limits: HeadLimits = HeadLimits()
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    client: tuple[str, int] | None

    def _init_head_bound(self) -> None:
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    # --- what each parser tells us ---------------------------------------------------------------------

    def _counting_head(self) -> bool:
        """True while the bytes arriving belong to a request head (or precede one)."""
        raise NotImplementedError

    def _head_pending(self) -> bool:
        """True when part of a head has arrived and its end has not."""
        raise NotImplementedError

    def _feed(self, data: bytes) -> None:
        raise NotImplementedError

    # --- the accounting ---------------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.timeout_s, self._head_timed_out)

    def _head_ended(self) -> None:
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _bounded_data_received(self, data: bytes) -> None:
        while data and self._counting_head():
            budget = self.limits.max_bytes - self._head_bytes
            if budget <= 0:
                self._refuse(TOO_LARGE, "431: request head larger than %d bytes", self.limits.max_bytes)
                return
            piece, data = (data, b"") if len(data) <= budget else (data[:budget], data[budget:])
            self._head_bytes += len(piece)
            self._feed(piece)
            if self.transport.is_closing():
                return
        if data:
            self._feed(data)
            if self.transport.is_closing():
                return
        if self._head_pending():
            if self._head_bytes >= self.limits.max_bytes:
                self._refuse(TOO_LARGE, "431: request head larger than %d bytes", self.limits.max_bytes)
            else:
                self._arm_head_timer()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_pending():
            self._refuse(TIMED_OUT, "408: request head not complete within %g s", self.limits.timeout_s)
        else:  # connected, never sent a byte
            self.transport.close()

    def _refuse(self, response: bytes, message: str, arg: Any) -> None:
        log.warning(message + " (%s); connection closed", arg, self.client[0] if self.client else "?")
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.transport.write(response)
        self.transport.close()


class BoundedHttpToolsProtocol(_HeadBound, HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_head_bound()
        self._in_head = True  # between requests, bytes count towards the next head
        self._partial_head = False  # a head has begun (on_message_begin) and not ended

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_ended()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._in_head or self._head_bytes + len(data) >= self.limits.max_bytes:
            self._bounded_data_received(data)
            return
        # The usual case, kept short (it runs for every read): a read that cannot exceed the bound.
        self._head_bytes += len(data)
        HttpToolsProtocol.data_received(self, data)
        if self._partial_head and not self.transport.is_closing():
            self._arm_head_timer()

    def _feed(self, data: bytes) -> None:
        HttpToolsProtocol.data_received(self, data)

    def _counting_head(self) -> bool:
        return self._in_head

    def _head_pending(self) -> bool:
        return self._partial_head

    def on_message_begin(self) -> None:
        self._in_head = self._partial_head = True
        HttpToolsProtocol.on_message_begin(self)

    def on_headers_complete(self) -> None:
        self._in_head = self._partial_head = False
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_ended()
        HttpToolsProtocol.on_headers_complete(self)

    def on_message_complete(self) -> None:
        self._in_head = True
        HttpToolsProtocol.on_message_complete(self)


class BoundedH11Protocol(_HeadBound, H11Protocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_head_bound()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_ended()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._bounded_data_received(data)

    def _feed(self, data: bytes) -> None:
        H11Protocol.data_received(self, data)
        if self.conn.their_state is not h11.IDLE:  # h11 turned the head into a Request event
            self._head_ended()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start the next cycle on a pipelined, partly received head
        if not self.transport.is_closing() and self._head_pending():
            self._arm_head_timer()

    def _counting_head(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def _head_pending(self) -> bool:
        return self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])


def bounded_protocol(
    limits: HeadLimits, parser: Literal["auto", "httptools", "h11"] = "auto"
) -> type[asyncio.Protocol]:
    """The class for `uvicorn.Config(http=...)`; "auto" is httptools when installed, as in uvicorn."""
    base: type[_HeadBound]
    if parser == "h11":
        base = BoundedH11Protocol
    elif parser == "httptools":
        base = BoundedHttpToolsProtocol
    else:
        try:
            import httptools  # noqa: F401
        except ImportError:  # pragma: no cover - httptools is a dependency
            base = BoundedH11Protocol
        else:
            base = BoundedHttpToolsProtocol
    cls = type(base.__name__, (base,), {"limits": limits})
    return cls
