"""Non-text customer messages that carry meaning (a product card, an order, a link, ...) as a question.

The body fields come from WeCom as `InboundMessage.body_fields` (docs/wecom-kf.md, per-msgtype bodies).
Several shapes are not verified, so every field is read defensively, cleaned of control characters and
bounded: the values are hostile, and the result goes to Dify as the customer's question.

Templates come from the operator (`[TEXTS] msg_<msgtype>`) and know only plain `{name}` fields: attribute
or index access, conversions and format specs make a template invalid, and an invalid or empty template
means "no question" (the caller then sends the usual `unsupported` reply). A clause of a template (the
text between `，` `；` `, ` `; ` or a line break) whose fields are all empty is left out, so a card without
a price does not read "价格： 元"; the first clause, which says what the message is, is kept when it has
words of its own.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Callable, Mapping
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any

from domain.messages import InboundMessage

TEMPLATE_PREFIX = "msg_"
MAX_FIELD_CHARS = 500
MAX_QUESTION_CHARS = 4000
MAX_MERGED_ITEMS = 20
MAX_MERGED_CHARS = 2000
# A forwarded chat history larger than this is not decoded at all (its title still is).
MAX_MERGED_JSON_CHARS = 1_000_000
ELLIPSIS = "…"

# Keyed by the `[TEXTS]` key. `msg_business_card` is empty on purpose: a card carries only the WeCom userid
# of a colleague, which tells Dify nothing it could answer, so the customer gets the `unsupported` reply.
# No key at all (video, note, unknown msgtypes): always the `unsupported` reply.
DEFAULT_MESSAGE_TEMPLATES: Mapping[str, str] = MappingProxyType(
    {
        "msg_location": "客户发送了位置：{name}，地址：{address}",
        "msg_link": "客户发送了链接：{title}，描述：{desc}，网址：{url}",
        "msg_business_card": "",
        "msg_miniprogram": "客户发送了小程序：{title}",
        "msg_channels_shop_product": "客户发送了商品：{title}，价格：{price} 元，店铺：{shop_nickname}",
        "msg_channels_shop_order": (
            "客户发送了订单：{order_id}，商品：{product_titles}，金额：{price}，状态：{state}，店铺：{shop_nickname}"
        ),
        "msg_merged_msg": "客户转发了聊天记录：{title}\n{items}",
        "msg_channels": "客户分享了视频号内容，标题：{title}，视频号：{nickname}",
    }
)


class TemplateError(ValueError):
    """A template that is not plain text with `{name}` fields."""


def question_for(message: InboundMessage, templates: Mapping[str, str]) -> str | None:
    """The question Dify gets for a non-text customer message, or None: answer with the `unsupported` text.

    `templates` maps `msg_<msgtype>` to its template; a missing or empty entry, an invalid template, an
    msgtype without meaning in words, or a body whose fields are all empty give None. Never raises.
    """
    return render_question(message.msgtype, message.body_fields, templates)


def render_question(msgtype: str, body: Mapping[str, object], templates: Mapping[str, str]) -> str | None:
    """`question_for` on a flattened body (scalars as text, nested objects as `a.b`, lists as JSON text)."""
    extract = _EXTRACTORS.get(msgtype)
    template = templates.get(TEMPLATE_PREFIX + msgtype, "")
    if extract is None or not isinstance(template, str) or not template.strip():
        return None
    try:
        clauses = _compile(template)
    except TemplateError:
        return None
    return _render(clauses, extract(body))


def template_problem(key: str, template: str) -> str | None:
    """Why `template` cannot serve `[TEXTS] key`, for configuration checks; None when it can (or is empty)."""
    if key not in TEMPLATE_FIELDS:
        return f"{key}: not a message template (known: {', '.join(sorted(TEMPLATE_FIELDS))})"
    try:
        clauses = _compile(template)
    except TemplateError as exc:
        return f"{key}: {exc}"
    allowed = TEMPLATE_FIELDS[key]
    unknown = sorted({name for _, pieces in clauses for is_field, name in pieces if is_field} - set(allowed))
    if unknown:
        return f"{key}: unknown field(s) {', '.join(unknown)} (available: {', '.join(allowed)})"
    return None


# --- templates -----------------------------------------------------------------------------------------

_FORMATTER = string.Formatter()
_SEPARATOR = re.compile(r"(，|；|\n|, |; )")
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# (separator before the clause, pieces); a piece is (is_field, literal text or field name).
_Clause = tuple[str, list[tuple[bool, str]]]


def _compile(template: str) -> list[_Clause]:
    clauses: list[_Clause] = [("", [])]
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:  # unbalanced braces
        raise TemplateError(f"not a template: {exc}") from None
    for literal, name, spec, conversion in parsed:
        parts = _SEPARATOR.split(literal)
        clauses[-1][1].append((False, parts[0]))
        for separator, text in zip(parts[1::2], parts[2::2], strict=True):
            clauses.append((separator, [(False, text)]))
        if name is None:
            continue
        if not _FIELD_NAME.fullmatch(name) or spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise TemplateError(f"{{{shown}}}: only plain field names like {{title}} are allowed")
        clauses[-1][1].append((True, name))
    return clauses


def _render(clauses: list[_Clause], values: Mapping[str, str]) -> str | None:
    names = [name for _, pieces in clauses for is_field, name in pieces if is_field]
    if names and not any(values.get(name) for name in names):
        return None
    out: list[str] = []
    for index, (separator, pieces) in enumerate(clauses):
        fields = [name for is_field, name in pieces if is_field]
        if fields and not any(values.get(name) for name in fields):
            heading = index == 0 and any(text.strip() for is_field, text in pieces if not is_field)
            if not heading:
                continue
        if out:
            out.append(separator)
        out.extend(values.get(text, "") if is_field else text for is_field, text in pieces)
    question = "".join(out).strip()
    return _bounded(question, MAX_QUESTION_CHARS) or None


# --- hostile values ------------------------------------------------------------------------------------

# Bidirectional overrides/isolates and marks: they reorder what Dify (and a human reading logs) sees.
_INVISIBLE = dict.fromkeys([0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0xFEFF])
_LINE_BREAKING = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SPACES = re.compile(r"\s+")


def _clean(value: object, limit: int = MAX_FIELD_CHARS) -> str:
    """One line of text: control characters and line breaks become spaces, runs of space one space."""
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        value = int(value) if value.is_integer() else value
    if not isinstance(value, str | int | float):
        return ""
    try:
        text = str(value).translate(_INVISIBLE)
    except ValueError:  # an int too long to print (sys.get_int_max_str_digits)
        return ""
    text = "".join(ch for ch in text if not 0xD800 <= ord(ch) <= 0xDFFF)  # lone surrogates
    text = _SPACES.sub(" ", _LINE_BREAKING.sub(" ", text)).strip()
    return _bounded(text, limit)


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(ELLIPSIS)].rstrip() + ELLIPSIS


def _first(body: Mapping[str, object], *keys: str) -> str:
    for key in keys:
        if text := _clean(body.get(key)):
            return text
    return ""


def _yuan(value: object) -> str:
    """WeCom prices are in fen, as a string or a number: "1999" → "19.99". Other text is shown as sent."""
    text = _clean(value)
    try:
        fen = Decimal(text)
    except InvalidOperation:
        return text
    if not fen.is_finite() or abs(fen) >= 10**15:  # "NaN", "Infinity", "1e999": no price at all
        return ""
    yuan = (fen / 100).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return f"{abs(yuan) if yuan.is_zero() else yuan}"


def _coordinate(value: object, bound: float) -> str:
    try:
        number = float(_clean(value))
    except ValueError:
        return ""
    if not math.isfinite(number) or abs(number) > bound:
        return ""
    return f"{number:.6f}".rstrip("0").rstrip(".")


# --- per msgtype ---------------------------------------------------------------------------------------


def _location(body: Mapping[str, object]) -> dict[str, str]:
    return {
        "name": _first(body, "name"),
        "address": _first(body, "address"),
        "latitude": _coordinate(body.get("latitude"), 90),
        "longitude": _coordinate(body.get("longitude"), 180),
    }


def _link(body: Mapping[str, object]) -> dict[str, str]:
    return {name: _first(body, name) for name in ("title", "desc", "url", "pic_url")}


def _business_card(body: Mapping[str, object]) -> dict[str, str]:
    return {"userid": _first(body, "userid", "user_id")}


def _miniprogram(body: Mapping[str, object]) -> dict[str, str]:
    return {name: _first(body, name) for name in ("title", "appid", "pagepath")}


def _shop_product(body: Mapping[str, object]) -> dict[str, str]:
    # Image field spellings differ between SDKs (head_img / head_image): both are read.
    return {
        "title": _first(body, "title"),
        "price": _yuan(body.get("sales_price")),
        "shop_nickname": _first(body, "shop_nickname"),
        "product_id": _first(body, "product_id"),
        "image": _first(body, "head_img", "head_image"),
        "shop_image": _first(body, "shop_head_img", "shop_head_image"),
    }


def _shop_order(body: Mapping[str, object]) -> dict[str, str]:
    return {
        "order_id": _first(body, "order_id"),
        "product_titles": _first(body, "product_titles"),
        # A wording ("¥19.90"), not a number in fen.
        "price": _first(body, "price_wording"),
        "state": _first(body, "state"),
        "shop_nickname": _first(body, "shop_nickname"),
        "image_url": _first(body, "image_url"),
    }


def _channels(body: Mapping[str, object]) -> dict[str, str]:
    return {name: _first(body, name) for name in ("title", "nickname", "sub_type")}


def _merged_msg(body: Mapping[str, object]) -> dict[str, str]:
    entries = _json_list(body.get("item")) or _json_list(body.get("items"))
    lines: list[str] = []
    used = 0
    for entry in entries:
        if len(lines) == MAX_MERGED_ITEMS:
            lines.append(ELLIPSIS)
            break
        line = _merged_line(entry)
        if not line:
            continue
        if used + len(line) > MAX_MERGED_CHARS:
            room = MAX_MERGED_CHARS - used
            if room > len(ELLIPSIS) * 2:
                lines.append(_bounded(line, room))
            else:
                lines.append(ELLIPSIS)
            break
        lines.append(line)
        used += len(line) + 1
    return {
        "title": _first(body, "title"),
        "items": "\n".join(lines),
        "count": str(len(entries)) if entries else "",
    }


def _json_list(value: object) -> list[Any]:
    if isinstance(value, list):
        return value
    if not isinstance(value, str) or len(value) > MAX_MERGED_JSON_CHARS:
        return []
    try:
        decoded = json.loads(value)
    except (ValueError, RecursionError):
        return []
    return decoded if isinstance(decoded, list) else []


def _merged_line(entry: object) -> str:
    """One forwarded message as "sender：text"; its `msg_content` is JSON text of unverified shape."""
    if not isinstance(entry, Mapping):
        return _clean(entry)
    msgtype = _clean(entry.get("msgtype"), 40)
    content: object = entry.get("msg_content", entry.get("content"))
    if isinstance(content, str) and content[:1] in ("{", "[", '"'):
        try:
            content = json.loads(content)
        except (ValueError, RecursionError):
            pass
    text = _text_in(content, msgtype) or (f"[{msgtype}]" if msgtype else "")
    if not text:
        return ""
    sender = _clean(entry.get("sender_name"), 60)
    return _bounded(f"{sender}：{text}" if sender else text, MAX_FIELD_CHARS)


_CONTENT_KEYS = ("content", "title", "desc", "name", "address", "product_titles")


def _text_in(content: object, msgtype: str) -> str:
    if not isinstance(content, Mapping):
        return _clean(content)
    for key in (msgtype, "text"):
        inner = content.get(key) if key else None
        if isinstance(inner, Mapping):
            if text := _first(inner, *_CONTENT_KEYS):
                return text
        elif text := _clean(inner):
            return text
    return _first(content, *_CONTENT_KEYS)


_EXTRACTORS: dict[str, Callable[[Mapping[str, object]], dict[str, str]]] = {
    "location": _location,
    "link": _link,
    "business_card": _business_card,
    "miniprogram": _miniprogram,
    "channels_shop_product": _shop_product,
    "channels_shop_order": _shop_order,
    "merged_msg": _merged_msg,
    "channels": _channels,
}

# The fields each template may use, in the order the README lists them.
TEMPLATE_FIELDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {TEMPLATE_PREFIX + msgtype: tuple(extract({})) for msgtype, extract in _EXTRACTORS.items()}
)
