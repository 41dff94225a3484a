"""Which customer message the current task is handling, for every log line it writes.

Set once where a message's handling begins (the drain, the session events); tasks copy the context they start
in, so the Dify call, the replies and the media steps log it without passing it along. The log formatter
(adapters/inbound/log_setup.py) shows it next to the correlation id.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from domain.messages import InboundMessage


@dataclass(frozen=True, slots=True)
class MessageContext:
    kf: str
    customer: str
    msgid: str

    def fields(self) -> dict[str, str]:
        return {"kf": self.kf, "customer": self.customer, "msgid": self.msgid}


handled_message: ContextVar[MessageContext | None] = ContextVar("handled_message", default=None)


@contextmanager
def handling(message: InboundMessage) -> Iterator[MessageContext]:
    """Log lines written inside carry the message's kf account, customer and msgid."""
    context = MessageContext(message.open_kfid, message.external_userid, message.msgid)
    token = handled_message.set(context)
    try:
        yield context
    finally:
        handled_message.reset(token)
