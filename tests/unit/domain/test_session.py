"""Session-state rules: which events and origins mean which state, and when the bot may answer."""

from __future__ import annotations

import pytest

from domain.messages import InboundMessage, KfEvent, Origin
from domain.session import (
    SENDABLE,
    KnownSession,
    SessionState,
    bot_may_answer,
    handoff_target,
    state_after_event,
    state_after_item,
    state_for_message,
)


def _status_change(change_type: int | None) -> KfEvent:
    return KfEvent(event_type="session_status_change", change_type=change_type)


@pytest.mark.parametrize(
    ("change_type", "state"),
    [
        (1, SessionState.HUMAN),  # picked up from the queue
        (2, SessionState.HUMAN),  # transferred to another servicer
        (3, SessionState.ENDED),  # ended
        (4, SessionState.HUMAN),  # a servicer re-joined
    ],
)
def test_session_status_change_types_map_to_states(change_type: int, state: SessionState) -> None:
    assert state_after_event(_status_change(change_type)) is state


@pytest.mark.parametrize("change_type", [None, 0, 5, 99])
def test_unknown_change_types_say_nothing(change_type: int | None) -> None:
    assert state_after_event(_status_change(change_type)) is None


@pytest.mark.parametrize(
    "event_type", ["enter_session", "msg_send_fail", "servicer_status_change", "user_recall_msg", ""]
)
def test_other_events_say_nothing_about_the_session(event_type: str) -> None:
    assert state_after_event(KfEvent(event_type=event_type, change_type=1)) is None


def _item(
    origin: Origin, *, msgtype: str = "text", event: KfEvent | None = None, user: str = "wm1"
) -> InboundMessage:
    return InboundMessage(
        msgid="m1",
        open_kfid="wk1",
        external_userid=user,
        send_time=100,
        origin=origin,
        msgtype=msgtype,
        event=event,
    )


def test_a_servicer_message_means_a_human_owns_the_session() -> None:
    assert state_after_item(_item(Origin.SERVICER)) is SessionState.HUMAN


def test_an_event_item_uses_the_event_rule() -> None:
    item = _item(Origin.SYSTEM, msgtype="event", event=_status_change(3))
    assert state_after_item(item) is SessionState.ENDED


def test_items_without_a_customer_say_nothing() -> None:
    assert state_after_item(_item(Origin.SERVICER, user="")) is None


def test_customer_messages_are_not_items_that_reveal_a_state() -> None:
    assert state_after_item(_item(Origin.CUSTOMER)) is None


def test_the_bot_answers_only_new_and_bot_sessions() -> None:
    assert SENDABLE == {SessionState.NEW, SessionState.BOT}
    assert bot_may_answer(SessionState.NEW) and bot_may_answer(SessionState.BOT)
    assert not bot_may_answer(SessionState.QUEUED)
    assert not bot_may_answer(SessionState.HUMAN)
    assert not bot_may_answer(SessionState.ENDED)


def test_an_unknown_state_is_answered_and_send_msg_decides() -> None:
    assert bot_may_answer(None)


def test_a_message_after_the_end_reopens_the_session() -> None:
    assert state_for_message(SessionState.ENDED, since=100, message_time=100) is SessionState.NEW
    assert state_for_message(SessionState.ENDED, since=100, message_time=150) is SessionState.NEW


def test_a_message_sent_before_the_end_is_not_answered_by_the_bot() -> None:
    assert state_for_message(SessionState.ENDED, since=100, message_time=99) is SessionState.ENDED


@pytest.mark.parametrize(
    "state", [SessionState.NEW, SessionState.BOT, SessionState.QUEUED, SessionState.HUMAN]
)
def test_a_customer_message_does_not_change_other_states(state: SessionState) -> None:
    assert state_for_message(state, since=100, message_time=200) is state


def test_handoff_goes_to_the_queue_or_the_named_servicer() -> None:
    assert handoff_target("") is SessionState.QUEUED
    assert handoff_target("zhangsan") is SessionState.HUMAN


def test_known_sessions_expire_after_the_time_to_live() -> None:
    known = KnownSession(SessionState.HUMAN, since=10, learned_at=1000)
    assert known.is_fresh(now=1059.9, ttl_s=60)
    assert not known.is_fresh(now=1060, ttl_s=60)
    assert not known.is_fresh(now=1000, ttl_s=0)


def test_state_codes() -> None:
    assert SessionState.from_code(3) is SessionState.HUMAN
    assert SessionState.from_code(7) is None
