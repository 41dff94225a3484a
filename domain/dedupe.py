"""What counts as "the same message", and how our replies to it are named so WeCom can refuse a repeat."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from domain.messages import InboundMessage

# WeCom send_msg `msgid`: at most 32 bytes of [0-9a-zA-Z_-], unique within the kf account.
MAX_OUTBOUND_MSGID = 32


@dataclass(frozen=True, slots=True)
class DedupeKey:
    """A `sync_msg` item is the same message as another when both name the same kf account and msgid.

    Retried callbacks, overlapping pulls and replays after a lost cursor all return the same msgid.
    """

    open_kfid: str
    msgid: str

    @classmethod
    def for_message(cls, message: InboundMessage) -> DedupeKey:
        return cls(message.open_kfid, message.msgid)


def outbound_msgid(key: DedupeKey, part: int) -> str:
    """The msgid of reply `part` to a customer message: the same on every attempt, so a resend is a repeat.

    Digest (26 hex chars) + "_" + part keeps within 32 bytes for parts up to 9999.
    """
    digest = hashlib.blake2b(f"{key.open_kfid}\x00{key.msgid}".encode(), digest_size=13).hexdigest()
    return f"{digest}_{part}"[:MAX_OUTBOUND_MSGID]
