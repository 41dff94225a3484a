"""What an operator can tune about the bot's behaviour: texts the customer sees, limits and timings."""

from __future__ import annotations

from dataclasses import dataclass, field

from domain.commands import DEFAULT_HANDOFF_WORDS, DEFAULT_RESET_WORDS
from domain.replies import DEFAULT_TRUNCATION_NOTICE


@dataclass(frozen=True, slots=True)
class ReplyTexts:
    """Customer-facing texts (Chinese by default, all configurable)."""

    fallback: str = "抱歉，我暂时无法回答您的问题，请稍后再试。"
    unsupported: str = "抱歉，我暂时只能处理文字消息，请用文字描述您的问题。"
    reset_done: str = "好的，我们重新开始吧。请问有什么可以帮您？"
    truncated: str = DEFAULT_TRUNCATION_NOTICE
    interim: str = "正在为您查询，请稍候…"
    handoff: str = "正在为您转接人工客服，请稍候。"
    handoff_failed: str = "抱歉，暂时无法转接人工客服，请稍后再试。"
    rate_limited: str = "您发送消息太频繁了，请稍后再试。"
    welcome: str = ""


@dataclass(frozen=True, slots=True)
class BotOptions:
    texts: ReplyTexts = field(default_factory=ReplyTexts)
    reset_words: tuple[str, ...] = DEFAULT_RESET_WORDS
    handoff_words: tuple[str, ...] = DEFAULT_HANDOFF_WORDS
    # Customer messages older than this are recorded but never answered (history replays, long outages).
    max_message_age_s: float = 600.0
    conversation_idle_ttl_s: float = 24 * 3600.0
    dify_concurrency: int = 32
    dify_retries: int = 1
    # Pause before asking Dify again after a retryable failure (429, 5xx, transient model error).
    dify_retry_delay_s: float = 1.5
    inputs: dict[str, str] = field(default_factory=dict)
    # Seconds Dify may take before the customer gets the interim text; 0 turns it off.
    interim_after_s: float = 0.0
    send_retries: int = 2
    send_retry_delay_s: float = 0.5
    # A claimed message is renewed every third of this while it is answered; a dead instance's claim
    # expires after it and another instance answers the message.
    message_lease_s: float = 60.0
    pull_lease_s: float = 60.0
    # How often an instance pulls every known kf account without a callback, to catch lost callbacks.
    recovery_interval_s: float = 60.0
    # How long a drain waits for another instance that holds the customer's earlier message.
    busy_poll_s: float = 0.5
