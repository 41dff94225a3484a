"""What a `msg_send_fail` event means (docs/wecom-kf.md §5.4), and who should not get proactive texts any
more."""

from __future__ import annotations

from dataclasses import dataclass

# fail_type → meaning. 7 and 9 appear only in older transcriptions, 11 and 12 only in the 2024 one; 13 was
# seen in the wild for a content-security block (docs/wecom-kf.md §10.12). Unknown values are reported
# generically.
FAIL_TYPES: dict[int, str] = {
    0: "unknown reason",
    1: "kf account deleted",
    2: "app closed",
    4: "session expired (more than 48 h since the customer's last message)",
    5: "session closed",
    6: "over the 5-messages-per-customer-message limit",
    7: "WeChat Channels (视频号) not bound",
    8: "subject not verified",
    9: "WeChat Channels not bound and subject not verified",
    10: "the customer rejected messages (拒收)",
    11: "no member of the corp has logged in to the WeCom app",
    12: "message type forbidden by the kf component",
    13: "blocked by content security",
}
CUSTOMER_REJECTED = 10


def describe_fail_type(fail_type: int | None) -> str:
    if fail_type is None:
        return "no fail_type given"
    return FAIL_TYPES.get(fail_type, f"undocumented fail_type {fail_type}")


def means_customer_rejects(fail_type: int | None) -> bool:
    return fail_type == CUSTOMER_REJECTED


@dataclass(frozen=True, slots=True)
class Rejection:
    """A customer refused our messages at `at` (Unix seconds, the event's send_time)."""

    at: float
    until: float

    def applies(self, *, now: float, message_time: float | None = None) -> bool:
        """Still in force: not expired, and (when about a message) not lifted by a message the customer
        sent after refusing — their own next message clears it."""
        if now >= self.until:
            return False
        return message_time is None or message_time < self.at
