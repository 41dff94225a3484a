"""Explicit JSON for the values a shared state store keeps: inbound messages, conversations, marks, leases.

No pickle: whatever another process (or an attacker with access to the cache) wrote is parsed as data, never
executed. Field names are short and stable; decoding ignores unknown fields and fills absent ones with their
defaults, so instances running two releases side by side can read each other's values.

Strings are encoded as UTF-8 with `surrogatepass`, so every Python `str` (even one carrying a lone surrogate
from a `\\ud800` escape in WeCom's JSON) round-trips exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from domain.conversation import Conversation
from domain.messages import EVENT_NUMBER_FIELDS, EVENT_TEXT_FIELDS, InboundMessage, KfEvent, Origin


class UndecodableValue(ValueError):
    """The bytes are not a value this codec wrote."""


def dumps(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
        "utf-8", "surrogatepass"
    )


def loads(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8", "surrogatepass"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UndecodableValue(f"not JSON: {exc}") from exc


# --- InboundMessage -------------------------------------------------------------------------------------


def message_to_dict(message: InboundMessage) -> dict[str, object]:
    data: dict[str, object] = {
        "msgid": message.msgid,
        "open_kfid": message.open_kfid,
        "external_userid": message.external_userid,
        "send_time": message.send_time,
        "origin": int(message.origin),
        "msgtype": message.msgtype,
    }
    optional: dict[str, object] = {
        "text": message.text,
        "menu_id": message.menu_id,
        "media_id": message.media_id,
        "summary": message.summary,
    }
    data.update({name: value for name, value in optional.items() if value})
    if message.event is not None:
        data["event"] = _event_to_dict(message.event)
    if message.extra:
        data["extra"] = dict(message.extra)
    return data


def message_from_dict(data: object) -> InboundMessage:
    d = _mapping(data, "message")
    try:
        event = d.get("event")
        extra = d.get("extra") or {}
        return InboundMessage(
            msgid=_str(d["msgid"]),
            open_kfid=_str(d["open_kfid"]),
            external_userid=_str(d.get("external_userid", "")),
            send_time=int(d.get("send_time", 0)),
            origin=Origin.from_code(d.get("origin", 0)),
            msgtype=_str(d.get("msgtype", "")),
            text=_str(d.get("text", "")),
            menu_id=_str(d.get("menu_id", "")),
            media_id=_str(d.get("media_id", "")),
            event=None if event is None else _event_from_dict(event),
            summary=_str(d.get("summary", "")),
            extra={_str(k): _str(v) for k, v in _mapping(extra, "extra").items()},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UndecodableValue(f"not a message: {exc!r}") from exc


def _event_to_dict(event: KfEvent) -> dict[str, object]:
    data: dict[str, object] = {"event_type": event.event_type}
    for name in EVENT_TEXT_FIELDS:
        if value := getattr(event, name):
            data[name] = value
    for name in EVENT_NUMBER_FIELDS:
        if (number := getattr(event, name)) is not None:
            data[name] = number
    return data


def _event_from_dict(data: object) -> KfEvent:
    d = _mapping(data, "event")
    strings = {name: _str(d.get(name, "")) for name in EVENT_TEXT_FIELDS}
    numbers = {name: None if d.get(name) is None else int(d[name]) for name in EVENT_NUMBER_FIELDS}
    return KfEvent(event_type=_str(d["event_type"]), **strings, **numbers)  # type: ignore[arg-type]


def encode_messages(messages: Sequence[InboundMessage]) -> bytes:
    return dumps([message_to_dict(m) for m in messages])


def decode_messages(data: bytes) -> list[InboundMessage]:
    items = loads(data)
    if not isinstance(items, list):
        raise UndecodableValue("not a message list")
    return [message_from_dict(item) for item in items]


# --- Conversation ---------------------------------------------------------------------------------------


def encode_conversation(conversation: Conversation) -> bytes:
    return dumps(conversation.to_dict())


def decode_conversation(data: bytes) -> Conversation:
    d = _mapping(loads(data), "conversation")
    try:
        return Conversation.from_dict(d)
    except (KeyError, TypeError, ValueError) as exc:
        raise UndecodableValue(f"not a conversation: {exc!r}") from exc


# --- Message marks and leases ---------------------------------------------------------------------------

BUSY = "busy"
DONE = "done"
FREE = "free"  # a released lease: reads as "nobody holds it" and is taken over with CAS


@dataclass(frozen=True, slots=True)
class Mark:
    """A message's dedupe mark (`{"s":"busy","o":owner}`, `{"s":"done"}`) or a pull lease (busy/free)."""

    status: str
    owner: str = ""

    def held_by(self, owner: str) -> bool:
        return self.status == BUSY and self.owner == owner


def encode_mark(mark: Mark) -> bytes:
    return dumps({"s": mark.status, "o": mark.owner} if mark.owner else {"s": mark.status})


def decode_mark(data: bytes) -> Mark:
    """Anything unreadable counts as a lease held by nobody we know: never as "free" or "absent"."""
    try:
        d = _mapping(loads(data), "mark")
        status, owner = d.get("s"), d.get("o", "")
    except UndecodableValue:
        return Mark(BUSY, "")
    if status not in (BUSY, DONE, FREE) or not isinstance(owner, str):
        return Mark(BUSY, "")
    return Mark(status, owner)


# --- Scalars --------------------------------------------------------------------------------------------


def encode_str(value: str) -> bytes:
    return dumps(value)


def decode_str(data: bytes) -> str:
    value = loads(data)
    if not isinstance(value, str):
        raise UndecodableValue("not a string")
    return value


def encode_str_list(values: Sequence[str]) -> bytes:
    return dumps(list(values))


def decode_str_list(data: bytes) -> list[str]:
    values = loads(data)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise UndecodableValue("not a list of strings")
    return values


def _mapping(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UndecodableValue(f"not a {what} object")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value
