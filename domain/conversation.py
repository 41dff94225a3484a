"""A customer's Dify conversation: started, continued, reset, dropped when stale."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Conversation:
    """The Dify conversation a customer is in. Times are Unix seconds."""

    conversation_id: str
    started_at: float
    last_active_at: float
    turns: int = 0
    # The bot's last answer in it (Dify's message_id and when it went out): a customer asking for a human
    # right after it marks that answer (application/handoff_feedback.py).
    last_message_id: str = ""
    last_answer_at: float = 0.0

    @classmethod
    def started(cls, conversation_id: str, *, now: float) -> Conversation:
        return cls(conversation_id=conversation_id, started_at=now, last_active_at=now, turns=1)

    def continued(self, *, now: float, conversation_id: str | None = None) -> Conversation:
        """One more turn. Dify may hand back a different id (it never should); the newest wins."""
        return replace(
            self,
            conversation_id=conversation_id or self.conversation_id,
            last_active_at=now,
            turns=self.turns + 1,
        )

    def is_stale(self, *, now: float, idle_ttl_s: float) -> bool:
        """A conversation nobody used for `idle_ttl_s` is dropped; the next message starts afresh."""
        return idle_ttl_s > 0 and now - self.last_active_at > idle_ttl_s

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "conversation_id": self.conversation_id,
            "started_at": self.started_at,
            "last_active_at": self.last_active_at,
            "turns": self.turns,
        }
        if self.last_message_id:  # only once there is an answer to point at
            data["last_message_id"] = self.last_message_id
            data["last_answer_at"] = self.last_answer_at
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Conversation:
        return cls(
            conversation_id=str(data["conversation_id"]),
            started_at=float(data.get("started_at", 0.0)),  # type: ignore[arg-type]
            last_active_at=float(data.get("last_active_at", 0.0)),  # type: ignore[arg-type]
            turns=int(data.get("turns", 0)),  # type: ignore[call-overload]
            last_message_id=str(data.get("last_message_id") or ""),
            last_answer_at=float(data.get("last_answer_at") or 0.0),  # type: ignore[arg-type]
        )


def current_conversation_id(
    conversation: Conversation | None, *, now: float, idle_ttl_s: float
) -> str | None:
    """The id to continue with, or None to start a new Dify conversation."""
    if conversation is None or conversation.is_stale(now=now, idle_ttl_s=idle_ttl_s):
        return None
    return conversation.conversation_id


def after_answer(
    conversation: Conversation | None, *, conversation_id: str, now: float, idle_ttl_s: float
) -> Conversation:
    """The conversation to store once Dify answered within `conversation_id`."""
    if conversation is None or conversation.is_stale(now=now, idle_ttl_s=idle_ttl_s):
        return Conversation.started(conversation_id, now=now)
    if conversation.conversation_id != conversation_id:
        # Dify started a new conversation (e.g. the old one was gone and we retried without it).
        return Conversation.started(conversation_id, now=now)
    return conversation.continued(now=now)


def with_last_answer(conversation: Conversation, *, message_id: str, now: float) -> Conversation:
    """Remember the bot's newest answer in the conversation (for feedback on it)."""
    if not message_id:
        return conversation
    return replace(conversation, last_message_id=message_id, last_answer_at=now)
