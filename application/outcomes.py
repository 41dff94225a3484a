"""What became of one customer message: counted per outcome, returned by the answering use case."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    ANSWERED = "answered"
    RESET = "reset"
    HANDOFF = "handoff"
    UNSUPPORTED = "unsupported"
    FALLBACK = "fallback"
    RATE_LIMITED = "rate_limited"  # over the customer's fair-use limit: one notice per window, no Dify
    SILENT = "silent"  # a human owns the session, or nothing could be sent
