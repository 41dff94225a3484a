"""Who owns a customer's kf session, and whether the bot may answer (WeCom `service_state`, docs/wecom-kf.md
§7.2).

The bot answers only while WeCom lets the API own the session (states 0 and 1). While a human servicer
owns it (3) or it waits in the queue (2) the bot stays silent. An ended session (4) is reopened by the
customer's next message (it becomes 0), so a message sent after the end is answered again.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from domain.messages import InboundMessage, KfEvent


class SessionState(IntEnum):
    """kf `service_state` values."""

    NEW = 0  # 未处理: the customer wrote; the API may answer (→ 1)
    BOT = 1  # 由智能助手接待: the API answers
    QUEUED = 2  # 待接入池排队中: waits for a human
    HUMAN = 3  # 由人工接待: a servicer owns it; send_msg answers 95018
    ENDED = 4  # 已结束/未开始: the customer's next message makes it 0

    @classmethod
    def from_code(cls, code: int) -> SessionState | None:
        try:
            return cls(code)
        except ValueError:
            return None


# States in which kf/send_msg is allowed (docs/wecom-kf.md §6.1).
SENDABLE = frozenset({SessionState.NEW, SessionState.BOT})

# session_status_change `change_type` (docs/wecom-kf.md §5.4) → the state it leaves the session in.
_CHANGE_TYPES: dict[int, SessionState] = {
    1: SessionState.HUMAN,  # picked up from the queue by a servicer
    2: SessionState.HUMAN,  # transferred to another servicer
    3: SessionState.ENDED,  # ended by the servicer
    4: SessionState.HUMAN,  # a servicer re-joined an ended or transferred session
}


@dataclass(frozen=True, slots=True)
class KnownSession:
    """What this instance believes about one customer's session.

    `since`: when the state began, in Unix seconds (WeCom's send_time for events, our clock for lookups);
    `learned_at`: when we learned it (our clock), for the cache's time to live.
    """

    state: SessionState
    since: float
    learned_at: float
    servicer_userid: str = ""

    def is_fresh(self, *, now: float, ttl_s: float) -> bool:
        return now - self.learned_at < ttl_s


def state_after_event(event: KfEvent) -> SessionState | None:
    """The state a system event moves the session to; None when the event says nothing about it."""
    if event.event_type == "session_status_change" and event.change_type is not None:
        return _CHANGE_TYPES.get(event.change_type)
    return None


def state_after_item(message: InboundMessage) -> SessionState | None:
    """The state a non-customer `sync_msg` item reveals: a servicer writing owns the session (origin 5);
    session_status_change events move it. None when the item says nothing about the session."""
    if not message.external_userid:
        return None
    if message.is_from_servicer:
        return SessionState.HUMAN
    if message.event is not None:
        return state_after_event(message.event)
    return None


def state_for_message(known: SessionState, *, since: float, message_time: float) -> SessionState:
    """The state a customer message meets. A message sent after the session ended reopened it (→ 0);
    one sent before the end found it still with its previous owner, who can no longer be answered for."""
    if known is SessionState.ENDED and message_time >= since:
        return SessionState.NEW
    return known


def bot_may_answer(state: SessionState | None) -> bool:
    """True while the API owns the session. Unknown (the lookup failed) answers: send_msg decides."""
    return state is None or state in SENDABLE


def handoff_target(servicer_userid: str) -> SessionState:
    """`service_state/trans` target for a handoff: a named servicer (3), else the queue (2)."""
    return SessionState.HUMAN if servicer_userid else SessionState.QUEUED
