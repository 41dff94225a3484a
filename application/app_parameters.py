"""What each Dify app says about itself (`GET /parameters`), read once per TTL rather than per message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from application.errors import ChatEngineError
from application.routing import KfRoute
from domain.chat import AppParameters


class AppParametersCache:
    """Each app's parameters, reused for `ttl_s`; one fetch at a time per app.

    With `failure_retry_s`, a failed fetch is remembered that long (its error is raised again) rather than
    asking Dify again at every message."""

    def __init__(
        self, *, ttl_s: float, failure_retry_s: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl_s
        self._failure_retry = failure_retry_s
        self._clock = clock
        # Keyed by the engine: routes that share a Dify app share its parameters.
        self._cache: dict[int, tuple[float, AppParameters | ChatEngineError]] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    async def get(self, route: KfRoute) -> AppParameters:
        """Raises ChatEngineError when Dify cannot tell (now, or within `failure_retry_s` of a failure)."""
        key = id(route.engine)
        cached = self._fresh(key)
        if cached is None:
            async with self._locks.setdefault(key, asyncio.Lock()):
                cached = self._fresh(key)
                if cached is None:
                    cached = await self._fetch(key, route)
        if isinstance(cached, ChatEngineError):
            raise cached
        return cached

    def invalidate(self, route: KfRoute) -> None:
        """The app changed (a feature was switched off): read its parameters again next time."""
        self._cache.pop(id(route.engine), None)

    async def _fetch(self, key: int, route: KfRoute) -> AppParameters | ChatEngineError:
        try:
            parameters = await route.engine.parameters()
        except ChatEngineError as exc:
            if self._failure_retry > 0:
                self._cache[key] = (self._clock() + self._failure_retry, exc)
            return exc
        self._cache[key] = (self._clock() + self._ttl, parameters)
        return parameters

    def _fresh(self, key: int) -> AppParameters | ChatEngineError | None:
        entry = self._cache.get(key)
        if entry is None or self._clock() >= entry[0]:
            return None
        return entry[1]
