"""Work sharing's bookkeeping: which customers a look skips (busy elsewhere) and what share of the waiting
customers it takes while other instances answer the same kf account."""

from __future__ import annotations

from application.work_sharing import (
    ELSEWHERE_FIRST_S,
    ELSEWHERE_MAX_S,
    FAIR_SHARE_FLOOR,
    OTHERS_SEEN_S,
    BusyElsewhere,
    OtherInstances,
)
from domain.messages import CustomerRef

KF = "wkShare"
ALICE, BOB, CAROL = (CustomerRef(KF, name) for name in ("wmAlice", "wmBob", "wmCarol"))


def test_alone_an_instance_takes_everyone_waiting() -> None:
    others = OtherInstances()
    assert others.share(KF, 1000, now=0.0) == 1000
    others.seen("wkOther", now=0.0)
    assert others.share(KF, 1000, now=0.0) == 1000  # another kf account's instances are not this one's


def test_with_another_instance_seen_lately_a_look_takes_half_but_never_crumbs() -> None:
    others = OtherInstances()
    others.seen(KF, now=10.0)
    assert others.share(KF, 1000, now=10.0) == 500
    assert others.share(KF, 301, now=12.0) == 151
    assert others.share(KF, 100, now=12.0) == FAIR_SHARE_FLOOR
    assert others.share(KF, 10, now=12.0) >= 10  # a few customers: all of them
    assert others.share(KF, 1000, now=10.0 + OTHERS_SEEN_S) == 500
    assert others.share(KF, 1000, now=10.0 + OTHERS_SEEN_S + 0.1) == 1000  # not seen for a while: alone


def test_an_instance_answering_half_of_those_pending_leaves_the_rest_to_the_others() -> None:
    others = OtherInstances()
    others.seen(KF, now=0.0)
    # 1,000 pending: 300 answered here, 200 elsewhere, 500 waiting. Half of those waiting would be 250;
    # half of all pending less this instance's 300 is 200.
    assert others.share(KF, 500, now=0.0, pending=1000, mine=300) == 200
    # Already answering its half: it takes only the floor, the others take the rest.
    assert others.share(KF, 400, now=0.0, pending=1000, mine=600) == FAIR_SHARE_FLOOR
    # Alone, all of them.
    assert OtherInstances().share(KF, 400, now=0.0, pending=1000, mine=600) == 400


def test_customers_busy_elsewhere_are_skipped_with_a_growing_back_off_and_listed() -> None:
    busy = BusyElsewhere()
    busy.note(ALICE, now=0.0)
    busy.note(BOB, now=1.0)
    assert busy.skipped(KF, now=1.0) == [ALICE, BOB]
    assert busy.skips(ALICE, now=ELSEWHERE_FIRST_S - 0.01)
    assert busy.skipped(KF, now=ELSEWHERE_FIRST_S) == [BOB]
    busy.note(ALICE, now=10.0)  # still busy there: twice the wait
    assert busy.skips(ALICE, now=10.0 + 2 * ELSEWHERE_FIRST_S - 0.01)
    for _ in range(10):
        busy.note(ALICE, now=10.0)
    assert not busy.skips(ALICE, now=10.0 + ELSEWHERE_MAX_S)
    # Customers no longer pending are forgotten; the earliest recheck among the rest is when to look again.
    assert busy.next_recheck(KF, {ALICE, CAROL}) == 10.0 + ELSEWHERE_MAX_S
    assert busy.skipped(KF, now=0.0) == [ALICE]
