"""What the fake WeCom kf keeps and hands out: sent messages, stored media, sync requests, sessions, codes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from domain.media import bare_type, extension_for_type
from domain.messages import CustomerRef


class SentText(NamedTuple):
    """A text accepted by `kf/send_msg` (equal to a plain `(customer, text, msgid)` tuple)."""

    customer: CustomerRef
    text: str
    msgid: str


class SentOnEvent(NamedTuple):
    """A message accepted by `kf/send_msg_on_event`; `menu`: the (id, content) click items of a msgmenu."""

    code: str
    customer: CustomerRef
    text: str
    msgid: str
    menu: tuple[tuple[str, str], ...] = ()


class SentMenu(NamedTuple):
    """A msgmenu accepted by `kf/send_msg`: its head and (id, content) click items."""

    customer: CustomerRef
    head: str
    menu: tuple[tuple[str, str], ...]
    msgid: str


class SentMedia(NamedTuple):
    """An image/voice/video/file message accepted by `kf/send_msg`."""

    customer: CustomerRef
    msgtype: str
    media_id: str
    msgid: str


@dataclass(frozen=True, slots=True)
class StoredMedia:
    """Temporary media: what a customer sent (seeded) or what `media/upload` received."""

    media_id: str
    kind: str  # image | voice | video | file
    data: bytes
    content_type: str
    filename: str
    created_at: float
    uploaded: bool  # through media/upload (only those can be sent, docs/wecom-kf.md 40007 "wrong source API")


class SyncRequest(NamedTuple):
    open_kfid: str
    cursor: str | None
    token: str | None
    limit: int


@dataclass(frozen=True, slots=True)
class SyncResult:
    """One `sync_msg` page as WeCom JSON items."""

    items: list[dict[str, Any]]
    next_cursor: str
    has_more: bool


@dataclass(slots=True)
class Session:
    state: int = 4  # "ended / not started" until the customer writes
    servicer_userid: str = ""
    quota: int = 0
    last_customer_time: float | None = None
    codes_issued: set[int] = field(default_factory=set)  # trans targets that already handed out a msg_code


@dataclass(slots=True)
class EventCode:
    customer: CustomerRef
    expires_at: float
    msgtypes: frozenset[str]
    state: int | None  # the session state the code is bound to; None for welcome codes
    used: bool = False


def media_filename(stored: StoredMedia) -> str:
    """The name media/get gives in Content-Disposition: the sender's file name, else MEDIA_ID.ext."""
    if stored.filename:
        return stored.filename
    extension = extension_for_type(bare_type(stored.content_type))
    return f"{stored.media_id}.{extension}" if extension else stored.media_id
