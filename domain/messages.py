"""What WeCom tells us: customer messages, servicer messages and system events, classified."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import IntEnum, StrEnum
from types import MappingProxyType


class Origin(IntEnum):
    """Who sent a `sync_msg` item (WeCom kf `origin`)."""

    CUSTOMER = 3
    SYSTEM = 4
    SERVICER = 5
    UNKNOWN = 0

    @classmethod
    def from_code(cls, code: object) -> Origin:
        try:
            return cls(int(code))  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return cls.UNKNOWN


class Kind(StrEnum):
    """What a message is, as far as answering it is concerned."""

    TEXT = "text"
    IMAGE = "image"
    VOICE = "voice"
    VIDEO = "video"
    FILE = "file"
    LOCATION = "location"
    LINK = "link"
    EVENT = "event"
    OTHER = "other"

    @classmethod
    def from_msgtype(cls, msgtype: str) -> Kind:
        try:
            return cls(msgtype)
        except ValueError:
            return cls.OTHER


@dataclass(frozen=True, slots=True)
class CustomerRef:
    """One customer as seen through one kf account: the unit of conversation and ordering."""

    open_kfid: str
    external_userid: str

    def dify_user(self) -> str:
        """The Dify `user`: stable, and distinct per kf account so conversations never cross accounts."""
        return f"kf-{self.open_kfid}-{self.external_userid}"


@dataclass(frozen=True, slots=True)
class KfEvent:
    """A system event (`msgtype == "event"`, origin 4). Fields absent for a given event_type are empty."""

    event_type: str
    open_kfid: str = ""
    external_userid: str = ""
    welcome_code: str = ""
    scene: str = ""
    scene_param: str = ""
    fail_msgid: str = ""
    fail_type: int | None = None
    change_type: int | None = None
    msg_code: str = ""
    servicer_userid: str = ""
    old_servicer_userid: str = ""
    new_servicer_userid: str = ""
    recall_msgid: str = ""
    status: int | None = None


# KfEvent's fields by kind, in declaration order (event_type aside): what adapters map from and to JSON.
EVENT_TEXT_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(KfEvent) if f.type == "str" and f.name != "event_type"
)
EVENT_NUMBER_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(KfEvent) if f.type == "int | None")


# Keys of `InboundMessage.extra` that come from the sync_msg item itself rather than from its body.
_ITEM_LEVEL_EXTRA = frozenset({"servicer_userid"})


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One item of `kf/sync_msg`'s `msg_list`, reduced to what the bot uses."""

    msgid: str
    open_kfid: str
    external_userid: str
    send_time: int
    origin: Origin
    msgtype: str
    text: str = ""
    menu_id: str = ""
    media_id: str = ""
    event: KfEvent | None = None
    # Short human summary of bodies we do not interpret (location, link, ...), for logs and Dify context.
    summary: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def kind(self) -> Kind:
        return Kind.from_msgtype(self.msgtype)

    @property
    def customer(self) -> CustomerRef:
        return CustomerRef(self.open_kfid, self.external_userid)

    @property
    def body_fields(self) -> Mapping[str, str]:
        """The body of a msgtype without its own attributes (location, link, product card, ...), read-only.

        Flattened as the WeCom adapter stores it in `extra`: scalars as strings, nested objects as `a.b`
        keys, lists as JSON text. Item-level keys (`servicer_userid`) are left out.
        """
        return MappingProxyType({k: v for k, v in self.extra.items() if k not in _ITEM_LEVEL_EXTRA})

    @property
    def is_from_customer(self) -> bool:
        return self.origin is Origin.CUSTOMER and self.kind is not Kind.EVENT and bool(self.external_userid)

    @property
    def is_from_servicer(self) -> bool:
        return self.origin is Origin.SERVICER

    @property
    def is_event(self) -> bool:
        return self.kind is Kind.EVENT


def is_too_old(message: InboundMessage, *, now: float, max_age_s: float) -> bool:
    """Old history (a first sync returns up to three days) is recorded but never answered."""
    return now - message.send_time > max_age_s


@dataclass(frozen=True, slots=True)
class CallbackNotice:
    """A decrypted WeCom callback, reduced to what tells us to pull."""

    event: str
    token: str = ""
    open_kfid: str = ""
    create_time: int = 0

    @property
    def asks_for_pull(self) -> bool:
        return self.event == "kf_msg_or_event"


@dataclass(frozen=True, slots=True)
class SyncPage:
    """One page of `kf/sync_msg`."""

    messages: tuple[InboundMessage, ...]
    next_cursor: str
    has_more: bool
