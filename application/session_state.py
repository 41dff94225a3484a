"""What this instance knows about customers' kf sessions: a short-lived cache fed by events, replies and,
when nothing fresh is known, one `kf/service_state/get` per customer per time to live.

Per instance by design: events reach the instance that pulls the kf account, and the time to live bounds
how long another instance may act on an outdated state (at worst one reply attempt answered 95018).
"""

from __future__ import annotations

import logging

from application.errors import WeComError
from application.ports import Clock, KfChannel
from application.telemetry import Telemetry
from domain.messages import CustomerRef, InboundMessage
from domain.session import KnownSession, SessionState, state_for_message

log = logging.getLogger("kfdify.session")

DEFAULT_TTL_S = 60.0


class SessionStates:
    def __init__(
        self,
        *,
        channel: KfChannel,
        clock: Clock,
        telemetry: Telemetry,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = 100_000,
    ) -> None:
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
        return entry

    async def state_for(self, message: InboundMessage) -> SessionState | None:
        """The state the customer's `message` meets; None when it is unknown (the lookup failed). Called while
        the message is handled: the log context names the customer (application/log_context.py)."""
        customer = message.customer
        known = self.known(customer) or await self._lookup(customer)
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
        log.info(
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
