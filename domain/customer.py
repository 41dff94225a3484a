"""Who a customer is and where they came from: WeCom's customer profile and entry context
(docs/wecom-kf.md §11).

The profile comes from `kf/customer/batchget` (nickname, gender, unionid); the entry context from the
`enter_session` event or batchget's session context (scene, scene_param, the 视频号 a customer came from).
All of it is outside input: cleaned and bounded here before anything stores or forwards it.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote

# scene_param is at most 128 bytes once URL-decoded (docs/wecom-kf.md §11); so are the other short fields.
SCENE_PARAM_MAX_BYTES = 128
_SHORT_TEXT_MAX_BYTES = 128
_GENDER_TEXTS = {1: "男", 2: "女"}
UNKNOWN_GENDER = "未知"


def clean_text(value: object, *, max_bytes: int = _SHORT_TEXT_MAX_BYTES) -> str:
    """A short outside string made safe to keep and forward: control characters dropped, whitespace
    trimmed, cut at `max_bytes` of UTF-8 on a character boundary."""
    if not isinstance(value, str):
        return ""
    kept = "".join(ch for ch in value if unicodedata.category(ch)[0] != "C" or ch in " ").strip()
    data = kept.encode("utf-8")
    if len(data) <= max_bytes:
        return kept
    return data[:max_bytes].decode("utf-8", errors="ignore").rstrip()


def clean_scene_param(value: object) -> str:
    """The scene_param a customer's entry link carried, URL-decoded (WeCom hands it over encoded), cleaned
    and cut to 128 bytes."""
    if not isinstance(value, str):
        return ""
    return clean_text(unquote(value), max_bytes=SCENE_PARAM_MAX_BYTES)


@dataclass(frozen=True, slots=True)
class EntryContext:
    """Where the customer entered the session from. `at`: Unix seconds of the event that told us."""

    scene: str = ""
    scene_param: str = ""
    channels_nickname: str = ""  # the 视频号 (WeChat Channels) account, when the customer came from one
    channels_scene: int = 0  # 1 视频号主页, 2 直播间商品列表页, 3 商品橱窗页, ... (as WeCom reports it)
    at: float = 0.0

    @property
    def is_empty(self) -> bool:
        return not (self.scene or self.scene_param or self.channels_nickname)

    @classmethod
    def of(
        cls,
        *,
        scene: object = "",
        scene_param: object = "",
        channels: object = None,
        at: float = 0.0,
    ) -> EntryContext:
        """From WeCom's fields (`wechat_channels`: {"nickname", "scene"}), cleaned."""
        nickname, channels_scene = "", 0
        if isinstance(channels, dict):
            nickname = clean_text(channels.get("nickname"))
            raw_scene = channels.get("scene")
            channels_scene = (
                raw_scene if isinstance(raw_scene, int) and not isinstance(raw_scene, bool) else 0
            )
        return cls(
            scene=clean_text(scene),
            scene_param=clean_scene_param(scene_param),
            channels_nickname=nickname,
            channels_scene=channels_scene,
            at=at,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "scene": self.scene,
            "scene_param": self.scene_param,
            "channels_nickname": self.channels_nickname,
            "channels_scene": self.channels_scene,
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, data: object) -> EntryContext | None:
        if not isinstance(data, dict):
            return None
        at = data.get("at", 0.0)
        channels_scene = data.get("channels_scene", 0)
        return cls(
            scene=clean_text(data.get("scene")),
            scene_param=clean_text(data.get("scene_param"), max_bytes=SCENE_PARAM_MAX_BYTES),
            channels_nickname=clean_text(data.get("channels_nickname")),
            channels_scene=channels_scene if isinstance(channels_scene, int) else 0,
            at=float(at) if isinstance(at, int | float) else 0.0,
        )


@dataclass(frozen=True, slots=True)
class CustomerProfile:
    """What the service knows about one customer. `fetched_at`: when batchget last described them (Unix
    seconds; 0 = never, e.g. only an enter_session event told us something)."""

    nickname: str = ""
    gender: int = 0  # 0 unknown, 1 male, 2 female (WeCom's codes)
    unionid: str = ""
    entry: EntryContext | None = None
    fetched_at: float = 0.0

    @property
    def gender_text(self) -> str:
        return _GENDER_TEXTS.get(self.gender, UNKNOWN_GENDER)

    def needs_fetch(self, *, now: float, refresh_s: float) -> bool:
        """batchget is asked at most once per customer per `refresh_s`."""
        return self.fetched_at <= 0 or now - self.fetched_at >= refresh_s

    def with_entry(self, entry: EntryContext) -> CustomerProfile:
        """The newest non-empty entry context wins."""
        if entry.is_empty:
            return self
        if self.entry is not None and self.entry.at > entry.at:
            return self
        return replace(self, entry=entry)

    def fetched(self, fresh: CustomerProfile, *, now: float) -> CustomerProfile:
        """Merge what batchget just said: its profile fields replace ours; its session context replaces ours
        only when it has one (batchget knows the context only for customers active in the last 48 h)."""
        merged = replace(
            self, nickname=fresh.nickname, gender=fresh.gender, unionid=fresh.unionid, fetched_at=now
        )
        return merged.with_entry(fresh.entry) if fresh.entry is not None else merged

    def to_dict(self) -> dict[str, Any]:
        return {
            "nickname": self.nickname,
            "gender": self.gender,
            "unionid": self.unionid,
            "entry": self.entry.to_dict() if self.entry is not None else None,
            "fetched_at": self.fetched_at,
        }

    @classmethod
    def from_dict(cls, data: object) -> CustomerProfile:
        """Raises ValueError when `data` is not a profile."""
        if not isinstance(data, dict):
            raise ValueError("a profile is an object")
        gender = data.get("gender", 0)
        fetched_at = data.get("fetched_at", 0.0)
        return cls(
            nickname=clean_text(data.get("nickname")),
            gender=gender if isinstance(gender, int) and gender in (0, 1, 2) else 0,
            unionid=clean_text(data.get("unionid")),
            entry=EntryContext.from_dict(data.get("entry")),
            fetched_at=float(fetched_at) if isinstance(fetched_at, int | float) else 0.0,
        )


@dataclass(frozen=True, slots=True)
class CustomerBatch:
    """One `kf/customer/batchget` answer: profiles by external_userid, and the ids WeCom did not know."""

    profiles: dict[str, CustomerProfile]
    invalid: tuple[str, ...] = ()
