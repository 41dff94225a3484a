"""`kf/sync_msg` items (WeCom JSON, docs/wecom-kf.md) to domain messages and events. Pure, never raises."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from domain.messages import EVENT_NUMBER_FIELDS, EVENT_TEXT_FIELDS, InboundMessage, KfEvent, Origin

MEDIA_MSGTYPES = frozenset({"image", "voice", "video", "file"})

_EVENT_KNOWN = frozenset({"event_type", *EVENT_TEXT_FIELDS, *EVENT_NUMBER_FIELDS})


def parse_sync_item(item: object) -> InboundMessage | None:
    """Map one `msg_list` item. None for items we cannot even identify (not an object, no msgid).

    WeCom has sent numbers as strings and omitted fields in the past, and new msgtypes appear without notice:
    every field is coerced defensively, and an unknown msgtype is kept as-is with a short `summary`.
    The body of any other msgtype (location, link, product and order cards, forwarded chat history, ...)
    is carried whole, flattened, as `extra`/`body_fields`: `domain.message_text` reads it from there, and
    the shared state store keeps it with the message.
    """
    if not isinstance(item, Mapping):
        return None
    msgid = _str(item.get("msgid"))
    if not msgid:
        return None
    msgtype = _str(item.get("msgtype"))
    raw_body = item.get(msgtype) if msgtype else None
    body: Mapping[str, Any] = raw_body if isinstance(raw_body, Mapping) else {}
    open_kfid = _str(item.get("open_kfid"))
    external_userid = _str(item.get("external_userid"))
    extra: dict[str, str] = {}
    servicer = _str(item.get("servicer_userid"))
    if servicer:
        extra["servicer_userid"] = servicer
    text = menu_id = media_id = summary = ""
    event: KfEvent | None = None

    if msgtype == "text":
        text = _str(body.get("content"))
        menu_id = _str(body.get("menu_id"))
    elif msgtype in MEDIA_MSGTYPES:
        media_id = _str(body.get("media_id"))
    elif msgtype == "event":
        event = _parse_event(body)
        # Events carry the kf account and customer only inside `event` (docs/wecom-kf.md).
        open_kfid = open_kfid or event.open_kfid
        external_userid = external_userid or event.external_userid
        extra.update(_flatten({k: v for k, v in body.items() if k not in _EVENT_KNOWN}))
    else:
        extra.update(_flatten(body))
        summary = _summary(msgtype, body)

    return InboundMessage(
        msgid=msgid,
        open_kfid=open_kfid,
        external_userid=external_userid,
        send_time=_int(item.get("send_time")) or 0,
        origin=Origin.from_code(item.get("origin")),
        msgtype=msgtype,
        text=text,
        menu_id=menu_id,
        media_id=media_id,
        event=event,
        summary=summary,
        extra=extra,
    )


def to_sync_item(message: InboundMessage) -> dict[str, Any]:
    """The inverse of `parse_sync_item`, for fakes and emulators: the JSON WeCom would return for `message`.

    Exact for text, media and event messages. Other msgtypes are rebuilt from `body_fields` (as
    `parse_sync_item` fills them: nested objects and known numbers and arrays restored), so their body
    round-trips exactly, and their `summary` does when the fields are complete.
    """
    item: dict[str, Any] = {
        "msgid": message.msgid,
        "send_time": message.send_time,
        "origin": int(message.origin),
        "msgtype": message.msgtype,
    }
    if message.msgtype != "event":
        item["open_kfid"] = message.open_kfid
        item["external_userid"] = message.external_userid
    servicer = message.extra.get("servicer_userid", "")
    if servicer:
        item["servicer_userid"] = servicer
    if message.msgtype == "text":
        text: dict[str, Any] = {"content": message.text}
        if message.menu_id:
            text["menu_id"] = message.menu_id
        item["text"] = text
    elif message.msgtype in MEDIA_MSGTYPES:
        item[message.msgtype] = {"media_id": message.media_id}
    elif message.msgtype == "event":
        ev = message.event or KfEvent(event_type="")
        body: dict[str, Any] = {"event_type": ev.event_type}
        body["open_kfid"] = ev.open_kfid or message.open_kfid
        body["external_userid"] = ev.external_userid or message.external_userid
        for name in EVENT_TEXT_FIELDS[2:]:
            value = getattr(ev, name)
            if value:
                body[name] = value
        for name in EVENT_NUMBER_FIELDS:
            value = getattr(ev, name)
            if value is not None:
                body[name] = value
        if not body["external_userid"]:
            del body["external_userid"]
        item["event"] = body
    elif message.msgtype:
        item[message.msgtype] = _unflatten(message.msgtype, message.body_fields)
    return item


# Body fields WeCom sends as JSON numbers or arrays, which `_flatten` turned into text (docs/wecom-kf.md).
_NUMBER_FIELDS = {"location": ("latitude", "longitude"), "channels": ("sub_type",)}
_LIST_FIELDS = {"merged_msg": ("item",), "msgmenu": ("list",)}


def _unflatten(msgtype: str, fields: Mapping[str, str]) -> dict[str, Any]:
    """A body `_flatten` maps back to `fields`: `a.b` keys nested again, known numbers and arrays restored.

    A value is only turned back into a number or an array when flattening that gives the same text again,
    and a dotted key that clashes with another field stays a literal key: `parse_sync_item` of the result
    always gives back `fields`.
    """
    body: dict[str, Any] = {}
    for key, value in fields.items():
        if "." not in key:
            body[key] = _restored(msgtype, key, value)
    for key in sorted((k for k in fields if "." in k), key=lambda k: k.count(".")):
        *path, leaf = key.split(".")
        node = _node_at(body, path)
        if node is None or leaf in node:
            body[key] = fields[key]
        else:
            node[leaf] = fields[key]
    return body


def _node_at(body: dict[str, Any], path: list[str]) -> dict[str, Any] | None:
    """The object at `path`, created as needed; None when a field that is not an object is in the way."""
    node = body
    for part in path:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return None
        node = child
    return node


def _restored(msgtype: str, key: str, value: str) -> Any:
    if key in _NUMBER_FIELDS.get(msgtype, ()):
        number = _float(value)
        if number is not None and _str(number) == value:
            return int(number) if number.is_integer() and "." not in value else number
    if key in _LIST_FIELDS.get(msgtype, ()) and value.startswith("["):
        try:
            decoded = json.loads(value)
        except (ValueError, RecursionError):
            return value
        if isinstance(decoded, list) and _flatten({key: decoded}).get(key) == value:
            return decoded
    return value


def _parse_event(body: Mapping[str, Any]) -> KfEvent:
    def text(name: str) -> str:
        return _str(body.get(name))

    return KfEvent(
        event_type=text("event_type"),
        open_kfid=text("open_kfid"),
        external_userid=text("external_userid"),
        welcome_code=text("welcome_code"),
        scene=text("scene"),
        scene_param=text("scene_param"),
        fail_msgid=text("fail_msgid"),
        fail_type=_int(body.get("fail_type")),
        change_type=_int(body.get("change_type")),
        msg_code=text("msg_code"),
        servicer_userid=text("servicer_userid"),
        old_servicer_userid=text("old_servicer_userid"),
        new_servicer_userid=text("new_servicer_userid"),
        recall_msgid=text("recall_msgid"),
        status=_int(body.get("status")),
    )


def _summary(msgtype: str, body: Mapping[str, Any]) -> str:
    def join(*parts: object) -> str:
        return " ".join(s for s in (_str(p) for p in parts) if s)

    if msgtype == "location":
        lat, lng = _float(body.get("latitude")), _float(body.get("longitude"))
        where = f"({_coord(lat)},{_coord(lng)})" if lat is not None and lng is not None else ""
        return join("[位置]", body.get("name"), body.get("address"), where)
    if msgtype == "link":
        return join("[链接]", body.get("title"), body.get("url"))
    if msgtype == "business_card":
        return join("[名片]", body.get("userid") or body.get("user_id"))
    if msgtype == "miniprogram":
        return join("[小程序]", body.get("title"), body.get("pagepath"))
    if msgtype == "msgmenu":
        items = body.get("list")
        contents = []
        for entry in items if isinstance(items, list) else []:
            if isinstance(entry, Mapping):
                sub = entry.get(_str(entry.get("type")))
                if isinstance(sub, Mapping):
                    contents.append(_str(sub.get("content")))
        return join(
            "[菜单]", body.get("head_content"), " / ".join(c for c in contents if c), body.get("tail_content")
        )
    if msgtype == "channels_shop_product":
        return join("[商品]", body.get("title"), body.get("shop_nickname"))
    if msgtype == "channels_shop_order":
        return join(
            "[订单]", body.get("product_titles"), body.get("price_wording"), body.get("shop_nickname")
        )
    if msgtype == "merged_msg":
        return join("[聊天记录]", body.get("title"))
    if msgtype == "channels":
        return join("[视频号]", body.get("nickname"), body.get("title"))
    return f"[{msgtype}]" if msgtype else "[未知消息]"


def _coord(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _flatten(body: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Scalar fields as strings (nested objects as `a.b`, lists as JSON) for `InboundMessage.extra`."""
    out: dict[str, str] = {}
    for key, value in body.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        elif isinstance(value, list):
            out[name] = json.dumps(value, ensure_ascii=False, default=str)
        elif value is not None:
            out[name] = _str(value)
    return out


def _str(value: object) -> str:
    if value is None or isinstance(value, Mapping | list):
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _int(value: object) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    number = _float(value)
    return int(number) if number is not None else None


def _float(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
