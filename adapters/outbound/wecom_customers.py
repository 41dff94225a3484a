"""`kf/customer/batchget` answers (docs/wecom-kf.md §11) read into domain profiles: shared by the real WeCom
adapter and the in-memory fake, so both read WeCom's JSON the same way. Everything in it is outside input."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from domain.customer import CustomerBatch, CustomerProfile, EntryContext, clean_text

MAX_IDS_PER_CALL = 100


def batchget_body(external_userids: list[str], *, with_context: bool) -> dict[str, Any]:
    return {"external_userid_list": external_userids, "need_enter_session_context": int(with_context)}


def parse_batchget(data: Mapping[str, Any], *, now: float) -> CustomerBatch:
    """The answer's customers by external_userid (malformed entries skipped) and the ids WeCom refused.
    `now` stamps the entry contexts (batchget does not say when the customer entered)."""
    profiles: dict[str, CustomerProfile] = {}
    listed = data.get("customer_list")
    for item in listed if isinstance(listed, list) else []:
        if not isinstance(item, Mapping):
            continue
        userid = item.get("external_userid")
        if not isinstance(userid, str) or not userid:
            continue
        gender = item.get("gender")
        context = item.get("enter_session_context")
        entry = None
        if isinstance(context, Mapping):
            entry = EntryContext.of(
                scene=context.get("scene", ""),
                scene_param=context.get("scene_param", ""),
                channels=dict(context["wechat_channels"])
                if isinstance(context.get("wechat_channels"), Mapping)
                else None,
                at=now,
            )
            entry = None if entry.is_empty else entry
        profiles[userid] = CustomerProfile(
            nickname=clean_text(item.get("nickname")),
            gender=gender if isinstance(gender, int) and gender in (1, 2) else 0,
            unionid=clean_text(item.get("unionid")),
            entry=entry,
        )
    refused = data.get("invalid_external_userid")
    invalid = tuple(u for u in refused if isinstance(u, str)) if isinstance(refused, list) else ()
    return CustomerBatch(profiles=profiles, invalid=invalid)
