"""The failover store's modes (application/failover_store.py explains them): which of the two stores answers
now, when degraded mode starts and ends, and how what the outage wrote reaches the primary on recovery."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from application.errors import StoreUnavailable
from application.ports import StateStore
from domain.dedupe import DedupeKey
from domain.messages import CustomerRef

log = logging.getLogger("application.failover_store")

T = TypeVar("T")


class FailoverMode:
    """Which store answers now: the primary, or the fallback while the primary is unreachable; entering
    degraded mode, probing the primary, and writing the outage's changes through on recovery."""

    def __init__(
        self,
        primary: StateStore,
        fallback: StateStore,
        *,
        retry_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._primary = primary
        self._fallback = fallback
        self._retry_interval = retry_interval_s
        self._clock = clock
        self._degraded = False
        self._recovering = False
        self._outages = 0
        self._outage_started = 0.0
        self._next_probe_at = 0.0
        # Written to the fallback during an outage, to be written through on recovery (dicts keep order).
        self._clear_pending = False
        self._dirty_kfs: dict[str, None] = {}
        self._dirty_cursors: dict[str, None] = {}
        self._dirty_done: dict[DedupeKey, None] = {}
        self._dirty_conversations: dict[CustomerRef, None] = {}

    async def aclose(self) -> None:
        """Close whichever of the two stores holds connections or threads."""
        for store in (self._primary, self._fallback):
            close = getattr(store, "aclose", None)
            if close is not None:
                await close()

    @property
    def backend(self) -> str:
        return self._primary.backend

    @property
    def degraded(self) -> bool:
        return self._degraded

    @property
    def outages(self) -> int:
        """How many times the primary became unreachable since start."""
        return self._outages

    # --- routing --------------------------------------------------------------------------------------

    async def _route(
        self, on_primary: Callable[[], Awaitable[T]], on_fallback: Callable[[], Awaitable[T]]
    ) -> T:
        if await self._primary_usable():
            try:
                return await on_primary()
            except StoreUnavailable as exc:
                self._enter_degraded(exc)
        return await on_fallback()

    def _enter_degraded(self, exc: StoreUnavailable) -> None:
        if self._degraded:
            return
        now = self._clock()
        self._degraded = True
        self._outages += 1
        self._outage_started = now
        self._next_probe_at = now + self._retry_interval
        log.warning(
            "state store unreachable; degraded mode: dedupe, leases, inbox and cursors are kept in this "
            "instance's memory until it answers again (retry every %g s): %s",
            self._retry_interval,
            exc,
        )

    async def _primary_usable(self) -> bool:
        if not self._degraded:
            return True
        if self._recovering or self._clock() < self._next_probe_at:
            return False
        self._recovering = True
        try:
            return await self._recover()
        finally:
            self._recovering = False

    async def _recover(self) -> bool:
        try:
            reachable = await self._primary.ping()
        except Exception:  # ping() must not raise; a broken one just means "not yet"
            reachable = False
        if reachable:
            try:
                await self._write_through()
            except StoreUnavailable as exc:
                log.debug("state store answered a ping but failed the write-through: %s", exc)
                reachable = False
        if not reachable:
            self._next_probe_at = self._clock() + self._retry_interval
            return False
        self._degraded = False
        log.info("state store reachable again after %.0f s", self._clock() - self._outage_started)
        return True

    async def _write_through(self) -> None:
        """Copy what the outage wrote into the primary. Loops until nothing is left: while this awaits, other
        operations keep writing to the fallback (degraded mode only ends after this returns)."""
        while True:
            if self._clear_pending:
                self._clear_pending = False
                try:
                    await self._primary.clear()
                except BaseException:
                    self._clear_pending = True
                    raise
            elif self._dirty_kfs:
                await _flush(self._dirty_kfs, self._primary.remember_kf)
            elif self._dirty_cursors:
                await _flush(self._dirty_cursors, self._write_cursor_through)
            elif self._dirty_done:
                await _flush(self._dirty_done, self._primary.finish)
            elif self._dirty_conversations:
                await _flush(self._dirty_conversations, self._write_conversation_through)
            else:
                return

    async def _write_cursor_through(self, open_kfid: str) -> None:
        cursor = await self._fallback.get_cursor(open_kfid)
        if cursor is not None:
            await self._primary.set_cursor(open_kfid, cursor)

    async def _write_conversation_through(self, customer: CustomerRef) -> None:
        conversation = await self._fallback.get_conversation(customer)
        if conversation is not None:
            await self._primary.put_conversation(customer, conversation)
        else:
            await self._primary.delete_conversation(customer)
        if customer not in self._dirty_conversations:  # not changed again while we wrote
            await self._fallback.delete_conversation(customer)


async def _flush(dirty: dict[T, None], write: Callable[[T], Awaitable[object]]) -> None:
    """Write one dirty item through; it stays dirty if the write fails."""
    item = next(iter(dirty))
    del dirty[item]
    try:
        await write(item)
    except BaseException:
        dirty.setdefault(item)
        raise
