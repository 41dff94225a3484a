"""Writing what this instance learned about a customer to the shared store without making anyone wait.

The session-owner cache and the refusals learn things in synchronous code (an event, a reply answered 95018).
`NoteWriter.put()` remembers the newest value per customer and topic and writes it in the background; a
second `put()` before the first write landed replaces the value, so the store ends up with the newest one and
writes are never reordered. A write that fails is logged and dropped: the note is advisory, and this instance
still has it in its own memory.
"""

from __future__ import annotations

import asyncio
import logging

from application.ports import CustomerNotes
from domain.messages import CustomerRef

log = logging.getLogger("kfdify.shared")

_Key = tuple[CustomerRef, str]


class NoteWriter:
    def __init__(self, notes: CustomerNotes) -> None:
        self._notes = notes
        self._waiting: dict[_Key, tuple[str | None, float]] = {}  # newest value (None: delete) and its TTL
        self._writers: dict[_Key, asyncio.Task[None]] = {}

    def put(self, customer: CustomerRef, topic: str, value: str, *, ttl_s: float) -> None:
        self._queue((customer, topic), value, ttl_s)

    def delete(self, customer: CustomerRef, topic: str) -> None:
        self._queue((customer, topic), None, 0.0)

    @property
    def pending(self) -> int:
        """Writes not yet done (tests wait for 0)."""
        return len(self._waiting) + len(self._writers)

    async def flush(self) -> None:
        """Wait until every queued write was tried."""
        while self._writers:
            await asyncio.gather(*self._writers.values(), return_exceptions=True)

    def _queue(self, key: _Key, value: str | None, ttl_s: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (a synchronous caller in a test): nothing shared to write to
        self._waiting[key] = (value, ttl_s)
        if key not in self._writers:
            self._writers[key] = loop.create_task(self._write(key))

    async def _write(self, key: _Key) -> None:
        customer, topic = key
        try:
            while key in self._waiting:
                value, ttl_s = self._waiting.pop(key)
                try:
                    if value is None:
                        await self._notes.delete_note(customer, topic)
                    else:
                        await self._notes.put_note(customer, topic, value, ttl_s=ttl_s)
                except Exception as exc:
                    log.warning("sharing the %s note failed (kept in this instance): %s", topic, exc)
        finally:
            del self._writers[key]
