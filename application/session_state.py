"""What the service knows about customers' kf sessions: a short-lived cache fed by events, replies and,
when nothing fresh is known, one `kf/service_state/get` per customer per time to live.

Shared through the store when `notes` (`CustomerNotes`) is given: what one instance learns (an event, a
handoff, a reply answered 95018) is written to the customer's "session" note in the background, and the
others read it. Each instance keeps its own copy and trusts it for `shared_check_s` (2 s) before it asks
the store again: another instance's news reaches this one within that time (at worst one reply attempt
answered 95018 meanwhile), and a customer's burst costs one store read per 2 s, not one per message. A
lookup made by one instance serves all of them for the time to live. Without notes (or while the store
fails) the cache is this instance's alone, bounded by the time to live as before.
"""

from __future__ import annotations

import json
import logging

from application.errors import WeComError
from application.ports import Clock, CustomerNotes, KfChannel
from application.shared_notes import NoteWriter
from application.telemetry import Telemetry
from domain.messages import CustomerRef, InboundMessage
from domain.session import KnownSession, SessionState, state_for_message

log = logging.getLogger("kfdify.session")

DEFAULT_TTL_S = 60.0
# How long this instance trusts its own copy before it reads what the other instances learned.
DEFAULT_SHARED_CHECK_S = 2.0
SESSION_TOPIC = "session"


class SessionStates:
    def __init__(
        self,
        *,
        channel: KfChannel,
        clock: Clock,
        telemetry: Telemetry,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = 100_000,
        notes: CustomerNotes | None = None,
        shared_check_s: float = DEFAULT_SHARED_CHECK_S,
    ) -> None:
        self._notes = notes
        self._writer = NoteWriter(notes) if notes is not None else None
        self._shared_check_s = shared_check_s
        self._checked: dict[CustomerRef, float] = {}  # when the shared note was last read
        self._channel = channel
        self._clock = clock
        self._telemetry = telemetry
        self._ttl = max(ttl_s, 0.0)
        self._max_entries = max_entries
        self._known: dict[CustomerRef, KnownSession] = {}
        self._lookup_failed: dict[CustomerRef, float] = {}

    def known(self, customer: CustomerRef) -> KnownSession | None:
        """The fresh knowledge about `customer`'s session, or None."""
        entry = self._known.get(customer)
        if entry is None or not entry.is_fresh(now=self._clock.now(), ttl_s=self._ttl):
            return None
        return entry

    def learn(
        self,
        customer: CustomerRef,
        state: SessionState,
        *,
        since: float | None = None,
        servicer_userid: str = "",
    ) -> KnownSession:
        now = self._clock.now()
        entry = KnownSession(
            state=state,
            since=now if since is None else since,
            learned_at=now,
            servicer_userid=servicer_userid if state is SessionState.HUMAN else "",
        )
        if len(self._known) >= self._max_entries and customer not in self._known:
            self._prune(now)
        self._known[customer] = entry
        self._lookup_failed.pop(customer, None)
        if self._writer is not None:
            self._writer.put(customer, SESSION_TOPIC, _encode(entry), ttl_s=self._ttl)
            if len(self._checked) >= self._max_entries:
                self._checked = {c: t for c, t in self._checked.items() if now - t < self._shared_check_s}
            self._checked[customer] = now  # ours is the newest: the store is read again after shared_check_s
        return entry

    @property
    def writer(self) -> NoteWriter | None:
        """The background writer of shared notes (None when not shared)."""
        return self._writer

    async def _shared(self, customer: CustomerRef) -> KnownSession | None:
        """The freshest of this instance's copy and what the other instances noted, read from the store at
        most once per `shared_check_s` per customer."""
        local = self.known(customer)
        if self._notes is None:
            return local
        now = self._clock.now()
        checked = self._checked.get(customer)
        if checked is not None and now - checked < self._shared_check_s:
            return local
        try:
            raw = (await self._notes.get_notes(customer, [SESSION_TOPIC])).get(SESSION_TOPIC)
        except Exception as exc:
            log.debug("reading the shared session note failed, using this instance's: %s", exc)
            return local
        if len(self._checked) >= self._max_entries:
            self._checked = {c: t for c, t in self._checked.items() if now - t < self._shared_check_s}
        self._checked[customer] = now
        shared = _decode(raw) if raw is not None else None
        if shared is None or not shared.is_fresh(now=now, ttl_s=self._ttl):
            return local
        if local is not None and local.learned_at > shared.learned_at:
            return local  # ours is newer (its write may still be on its way)
        if len(self._known) >= self._max_entries and customer not in self._known:
            self._prune(now)
        self._known[customer] = shared
        return shared

    async def state_for(self, message: InboundMessage) -> SessionState | None:
        """The state the customer's `message` meets; None when it is unknown (the lookup failed). Called while
        the message is handled: the log context names the customer (application/log_context.py)."""
        customer = message.customer
        known = await self._shared(customer) or await self._lookup(customer)
        if known is None:
            return None
        state = state_for_message(known.state, since=known.since, message_time=message.send_time)
        if state is not known.state:
            self.learn(customer, state, since=float(message.send_time))
        return state

    async def _lookup(self, customer: CustomerRef) -> KnownSession | None:
        now = self._clock.now()
        failed_at = self._lookup_failed.get(customer)
        if failed_at is not None and now - failed_at < self._ttl:
            return None  # at most one lookup per customer per time to live, failed or not
        try:
            answer = await self._channel.get_service_state(customer)
        except WeComError as exc:
            self._telemetry.count_labelled("wecom_errors", str(exc.errcode))
            log.warning(
                "service_state/get failed errcode=%s %s; answering as usual",
                exc.errcode,
                exc.errmsg,
            )
            if len(self._lookup_failed) >= self._max_entries:
                self._prune(now)
            self._lookup_failed[customer] = now
            return None
        self._telemetry.count("service_state_lookups")
        state = SessionState.from_code(answer.state)
        if state is None:
            log.warning("service_state/get answered an unknown state %s", answer.state)
            self._lookup_failed[customer] = now
            return None
        log.debug(
            "session state %d%s",
            state,
            f" servicer={answer.servicer_userid}" if answer.servicer_userid else "",
        )
        return self.learn(customer, state, since=now, servicer_userid=answer.servicer_userid)

    def _prune(self, now: float) -> None:
        self._known = {c: e for c, e in self._known.items() if e.is_fresh(now=now, ttl_s=self._ttl)}
        self._lookup_failed = {c: t for c, t in self._lookup_failed.items() if now - t < self._ttl}
        if len(self._known) >= self._max_entries:  # all fresh: drop the oldest half
            keep = sorted(self._known.items(), key=lambda item: item[1].learned_at)[len(self._known) // 2 :]
            self._known = dict(keep)


def _encode(entry: KnownSession) -> str:
    return json.dumps(
        {"s": int(entry.state), "since": entry.since, "at": entry.learned_at, "u": entry.servicer_userid},
        separators=(",", ":"),
        ensure_ascii=False,
    )


def _decode(raw: str) -> KnownSession | None:
    """A note another instance wrote; None when it is not one (ignored)."""
    try:
        data = json.loads(raw)
        state = SessionState.from_code(int(data["s"]))
        if state is None:
            return None
        servicer = data.get("u", "")
        return KnownSession(
            state=state,
            since=float(data["since"]),
            learned_at=float(data["at"]),
            servicer_userid=servicer if isinstance(servicer, str) else "",
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
