"""A resend whose first attempt did land: WeCom refuses the repeated msgid, and that counts as delivered.

The refusal's errcode is NOT VERIFIED (docs/wecom-kf.md §6.2): 95033, or 40058 naming the msgid or a repeat.
"""

from __future__ import annotations

import pytest

from adapters.outbound.fake_wecom import FakeKfChannel, KfWorld
from adapters.outbound.wecom_paths import SEND_MSG
from application.errors import WeComError
from application.options import BotOptions
from application.reply_session import ReplySession, refuses_repeated_msgid
from application.session_state import SessionStates
from application.telemetry import Telemetry
from domain.messages import CustomerRef, InboundMessage, Origin
from tests.support.containers import FakeClock

pytestmark = pytest.mark.anyio

KF = "wkResend"
ALICE = CustomerRef(KF, "wmAlice")
NOW = 1_700_000_000


class CountingChannel(FakeKfChannel):
    """The in-memory WeCom, counting every send_text attempt (the world records only what landed)."""

    def __init__(self, world: KfWorld) -> None:
        super().__init__(world)
        self.attempts: list[str] = []
        # attempt number (1-based) → the errcode and errmsg WeCom answers to it instead
        self.refuse: dict[int, tuple[int, str]] = {}

    async def send_text(self, customer: CustomerRef, text: str, *, msgid: str) -> str:
        self.attempts.append(msgid)
        if len(self.attempts) in self.refuse:
            errcode, errmsg = self.refuse[len(self.attempts)]
            self.world.fail_next(SEND_MSG, errcode, errmsg=errmsg)
        return await super().send_text(customer, text, msgid=msgid)


class Setup:
    def __init__(self) -> None:
        self.world = KfWorld(clock=lambda: float(NOW))
        msgid = self.world.add_customer_text(KF, ALICE.external_userid, "在吗", send_time=NOW)
        self.channel = CountingChannel(self.world)
        self.telemetry = Telemetry()
        message = InboundMessage(
            msgid=msgid,
            open_kfid=KF,
            external_userid=ALICE.external_userid,
            send_time=NOW,
            origin=Origin.CUSTOMER,
            msgtype="text",
            text="在吗",
        )
        sessions = SessionStates(channel=self.channel, clock=FakeClock(NOW), telemetry=self.telemetry)
        self.replies = ReplySession(
            channel=self.channel,
            message=message,
            telemetry=self.telemetry,
            options=BotOptions(send_retries=4, send_retry_delay_s=0.0),
            sessions=sessions,
        )

    def texts(self) -> list[str]:
        return self.world.texts_sent_to(ALICE)


async def test_a_lost_answer_then_the_fakes_repeat_refusal_counts_as_delivered_once() -> None:
    s = Setup()
    s.world.lose_response_next(SEND_MSG)

    assert await s.replies.send("您好") is True

    assert s.texts() == ["您好"]
    assert len(s.channel.attempts) == 2 and len(set(s.channel.attempts)) == 1
    assert s.replies.delivered == 1
    assert s.telemetry.counters["resend_already_delivered"] == 1
    assert s.telemetry.counters["replies_sent"] == 1


async def test_95033_on_a_resend_after_a_lost_answer_counts_as_delivered() -> None:
    s = Setup()
    s.world.lose_response_next(SEND_MSG)
    s.channel.refuse[2] = (95033, "msgid already exists")

    assert await s.replies.send("您好") is True

    assert len(s.channel.attempts) == 2
    assert s.telemetry.counters["resend_already_delivered"] == 1


async def test_the_next_part_gets_its_own_msgid_and_is_sent_normally() -> None:
    s = Setup()
    s.world.lose_response_next(SEND_MSG)

    assert await s.replies.send("第一段") is True
    assert await s.replies.send("第二段") is True

    assert s.texts() == ["第一段", "第二段"]
    assert len(s.channel.attempts) == 3 and len(set(s.channel.attempts)) == 2
    assert s.replies.delivered == 2


async def test_a_repeat_refusal_on_a_first_attempt_stays_a_failure() -> None:
    s = Setup()
    s.world.fail_next(SEND_MSG, 40058, errmsg="invalid parameter: duplicate msgid")

    assert await s.replies.send("您好") is False

    assert len(s.channel.attempts) == 1
    assert s.texts() == []
    assert s.telemetry.counters["resend_already_delivered"] == 0
    assert s.telemetry.labelled["wecom_errors"]["40058"] == 1


async def test_a_busy_first_attempt_did_not_land_so_a_repeat_refusal_after_it_is_a_failure() -> None:
    s = Setup()
    s.world.fail_next(SEND_MSG, -1, errmsg="system busy")
    s.world.fail_next(SEND_MSG, 95033, errmsg="msgid already exists")

    assert await s.replies.send("您好") is False

    assert len(s.channel.attempts) == 2
    assert s.telemetry.counters["resend_already_delivered"] == 0


async def test_another_40058_on_a_resend_is_a_failure() -> None:
    s = Setup()
    s.world.lose_response_next(SEND_MSG)
    s.channel.refuse[2] = (40058, "invalid parameter: content")

    assert await s.replies.send("您好") is False

    assert len(s.channel.attempts) == 2
    assert s.telemetry.counters["resend_already_delivered"] == 0


@pytest.mark.parametrize(
    ("errcode", "errmsg", "repeat"),
    [
        (95033, "", True),
        (40058, "duplicate msgid", True),
        (40058, "invalid parameter: MsgId exists", True),
        (40058, "消息ID重复", True),
        (40058, "invalid parameter", False),
        (95001, "msgid", False),
        (None, "duplicate msgid", False),
    ],
)
def test_what_counts_as_a_repeat_refusal(errcode: int | None, errmsg: str, repeat: bool) -> None:
    assert refuses_repeated_msgid(WeComError(errcode, errmsg)) is repeat
