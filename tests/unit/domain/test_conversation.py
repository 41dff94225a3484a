from __future__ import annotations

from domain.conversation import Conversation, after_answer, current_conversation_id


def test_first_answer_starts_a_conversation() -> None:
    conv = after_answer(None, conversation_id="c1", now=100.0, idle_ttl_s=60)
    assert conv.conversation_id == "c1" and conv.turns == 1 and conv.started_at == 100.0


def test_next_answer_continues_it() -> None:
    conv = Conversation.started("c1", now=100.0)
    later = after_answer(conv, conversation_id="c1", now=130.0, idle_ttl_s=60)
    assert later.turns == 2 and later.started_at == 100.0 and later.last_active_at == 130.0


def test_idle_conversation_is_dropped() -> None:
    conv = Conversation.started("c1", now=100.0)
    assert current_conversation_id(conv, now=150.0, idle_ttl_s=60) == "c1"
    assert current_conversation_id(conv, now=161.0, idle_ttl_s=60) is None
    assert current_conversation_id(conv, now=10_000.0, idle_ttl_s=0) == "c1"


def test_a_new_id_from_dify_starts_over() -> None:
    conv = Conversation.started("c1", now=100.0).continued(now=110.0)
    fresh = after_answer(conv, conversation_id="c2", now=120.0, idle_ttl_s=60)
    assert fresh.conversation_id == "c2" and fresh.turns == 1


def test_round_trips_through_a_dict() -> None:
    conv = Conversation.started("c1", now=100.5).continued(now=120.0)
    assert Conversation.from_dict(conv.to_dict()) == conv
