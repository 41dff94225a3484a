"""What an operator can tune about the bot's behaviour: texts the customer sees, limits and timings."""

from __future__ import annotations

from dataclasses import dataclass, field

from domain.commands import DEFAULT_HANDOFF_WORDS, DEFAULT_RESET_WORDS
from domain.handoff import DEFAULT_HANDOFF_MARKERS
from domain.message_text import DEFAULT_MESSAGE_TEMPLATES
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
    # Media (application/media.py). Dify refuses an empty query, so a lone image or file is asked with these.
    image_query: str = "请看这张图片。"
    file_query: str = "请看这个文件。"
    media_expired: str = "图片或文件已过期，请重新发送。"
    media_failed: str = "抱歉，图片或文件处理失败，请稍后再试，或用文字描述您的问题。"
    # {limit}: the size limit in MB.
    too_large: str = "文件太大了（不能超过 {limit} MB），请压缩后再发送。"
    # {accepted}: what the AI app accepts, e.g. "图片、PDF、DOCX".
    file_type_not_accepted: str = "抱歉，暂时无法处理这种文件。目前可以发送：{accepted}。"
    voice_failed: str = "抱歉，没能听清这条语音，请再说一遍或改用文字。"
    # Heads the links to files in an answer that cannot be sent as images.
    answer_files: str = "相关文件："
    # A paused workflow (Dify's human-input node): the turn ends with this, after any answer text.
    needs_human_input: str = "您的问题需要人工确认，我们会尽快回复您。"
    # Non-text messages asked in words (domain/message_text.py); "" = the `unsupported` reply.
    msg_location: str = DEFAULT_MESSAGE_TEMPLATES["msg_location"]
    msg_link: str = DEFAULT_MESSAGE_TEMPLATES["msg_link"]
    msg_business_card: str = DEFAULT_MESSAGE_TEMPLATES["msg_business_card"]
    msg_miniprogram: str = DEFAULT_MESSAGE_TEMPLATES["msg_miniprogram"]
    msg_channels_shop_product: str = DEFAULT_MESSAGE_TEMPLATES["msg_channels_shop_product"]
    msg_channels_shop_order: str = DEFAULT_MESSAGE_TEMPLATES["msg_channels_shop_order"]
    msg_merged_msg: str = DEFAULT_MESSAGE_TEMPLATES["msg_merged_msg"]
    msg_channels: str = DEFAULT_MESSAGE_TEMPLATES["msg_channels"]
    # Heads the menu of questions the AI app suggests after an answer (each one can be tapped).
    suggestions_head: str = "您可能还想问："

    # How Dify's logs name a customer's conversation (operator-facing): {nickname}, {external_userid},
    # {open_kfid}, {scene}; "" = do not name conversations.
    conversation_name: str = "微信客户 {nickname}"

    @property
    def message_templates(self) -> dict[str, str]:
        """`msg_<msgtype>` → template, for `domain.message_text.question_for`."""
        return {key: getattr(self, key) for key in DEFAULT_MESSAGE_TEMPLATES}


@dataclass(frozen=True, slots=True)
class BotOptions:
    texts: ReplyTexts = field(default_factory=ReplyTexts)
    reset_words: tuple[str, ...] = DEFAULT_RESET_WORDS
    handoff_words: tuple[str, ...] = DEFAULT_HANDOFF_WORDS
    # Customer messages older than this are recorded but never answered (history replays, long outages).
    max_message_age_s: float = 600.0
    conversation_idle_ttl_s: float = 24 * 3600.0
    # Ceiling of the adaptive number of Dify calls at once per Dify app (application/concurrency.py).
    dify_concurrency: int = 1000
    dify_retries: int = 1
    # Pause before asking Dify again after a retryable failure (429, 5xx, transient model error).
    dify_retry_delay_s: float = 1.5
    inputs: dict[str, str] = field(default_factory=dict)
    # Seconds Dify may take before the customer gets the interim text; 0 turns it off.
    interim_after_s: float = 5.0
    # Markers a Dify answer may contain to hand the customer to a human (never shown to the customer).
    handoff_markers: tuple[str, ...] = DEFAULT_HANDOFF_MARKERS
    # How long this instance trusts what it knows about a session's state before asking WeCom again.
    session_state_ttl_s: float = 60.0
    # Per-customer fair use: at most `rate_limit` answered messages per `rate_limit_window_s`; 0 = off.
    rate_limit: int = 20
    rate_limit_window_s: float = 60.0
    # A customer who refused our messages (msg_send_fail fail_type 10) gets no proactive texts this long.
    rejection_memory_s: float = 24 * 3600.0
    # The welcome_code lives 20 s (docs/wecom-kf.md): older enter_session events get no welcome, and composing
    # one (Dify /parameters) may take at most `welcome_deadline_s`.
    welcome_max_age_s: float = 20.0
    welcome_deadline_s: float = 15.0
    # How long the AI app's /parameters (opening statement, suggested questions) are reused.
    app_parameters_ttl_s: float = 300.0
    # Busy (-1), rate-limited (45009/45033) or unreachable WeCom: up to this many resends of the same
    # msgid, after 0.5, 1, 2, 4 s (each with jitter), so a minute-long hiccup still delivers the answer.
    send_retries: int = 4
    send_retry_delay_s: float = 0.5
    # A claimed message is renewed every third of this while it is answered; a dead instance's claim
    # expires after it and another instance answers the message.
    message_lease_s: float = 60.0
    # Under a flood of callbacks, consecutive pulls of one kf account start at least this far apart.
    pull_interval_s: float = 0.2
    # Renewed on every page of a pull; short, so a dead puller blocks its kf account only briefly.
    pull_lease_s: float = 15.0
    # How often an instance pulls every known kf account without a callback, to catch lost callbacks.
    recovery_interval_s: float = 60.0
    # How long a drain waits for another instance that holds the customer's earlier message.
    busy_poll_s: float = 0.5
    # An image followed by a text within this many seconds is asked as one question (0 = never wait).
    image_text_window_s: float = 3.0
    # Offer the questions the AI app suggests after an answer as a tappable menu, when the app has the
    # feature on (`suggested_questions_after_answer`); False: never.
    suggestions: bool = True
    # A handoff word within this many seconds of a bot answer records `dislike` feedback on that answer in
    # Dify (application/handoff_feedback.py); `handoff_feedback` off: never.
    feedback_window_s: float = 600.0
    handoff_feedback: bool = True
    # Texts a customer sends within this many seconds of each other are asked as one question (0 = off).
    merge_window_s: float = 0.0
    # Floor of the adaptive number of Dify calls at once per Dify app.
    dify_min_concurrency: int = 4
    # An answer's total deadline (queue, retries and Dify together); past it the customer gets the fallback.
    dify_deadline_s: float = 180.0
