"""Wall-clock time for the application (WeCom's send_time is Unix seconds)."""

from __future__ import annotations

import time


class SystemClock:
    def now(self) -> float:
        return time.time()
