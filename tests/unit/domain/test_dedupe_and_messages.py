from __future__ import annotations

import re

from domain.dedupe import DedupeKey, outbound_msgid
from domain.messages import InboundMessage, Kind, Origin, is_too_old


def msg(**kw: object) -> InboundMessage:
    base: dict[str, object] = dict(
        msgid="m1",
        open_kfid="wk1",
        external_userid="wm1",
        send_time=1000,
        origin=Origin.CUSTOMER,
        msgtype="text",
    )
    base.update(kw)
    return InboundMessage(**base)  # type: ignore[arg-type]


def test_outbound_msgid_is_stable_short_and_wecom_safe() -> None:
    key = DedupeKey("wkAJ2GCAAASSm4_FhToWMFea0xAFfd3Q", "from_msgid_4622416642169452483")
    first = outbound_msgid(key, 0)
    assert first == outbound_msgid(key, 0)
    assert first != outbound_msgid(key, 1)
    assert len(first.encode()) <= 32 and len(outbound_msgid(key, 9999)) <= 32
    assert re.fullmatch(r"[0-9a-zA-Z_-]+", first)


def test_same_msgid_on_another_kf_is_another_message() -> None:
    assert outbound_msgid(DedupeKey("wk1", "m"), 0) != outbound_msgid(DedupeKey("wk2", "m"), 0)


def test_classification() -> None:
    assert msg().is_from_customer and msg().kind is Kind.TEXT
    assert msg(msgtype="image").kind is Kind.IMAGE
    assert msg(msgtype="channels_shop_product").kind is Kind.OTHER
    assert not msg(origin=Origin.SERVICER).is_from_customer
    assert msg(origin=Origin.SERVICER).is_from_servicer
    assert not msg(msgtype="event", origin=Origin.SYSTEM).is_from_customer
    assert Origin.from_code("3") is Origin.CUSTOMER and Origin.from_code("x") is Origin.UNKNOWN


def test_age_filter() -> None:
    assert is_too_old(msg(send_time=0), now=1000, max_age_s=600)
    assert not is_too_old(msg(send_time=500), now=1000, max_age_s=600)
