"""A question to the AI app and its answer, in the bot's words (not Dify's JSON)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from domain.app_form import FormField


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file already uploaded to the AI app, referenced by a question."""

    kind: str  # "image" | "document" | "audio" | "video" | "custom"
    upload_file_id: str


@dataclass(frozen=True, slots=True)
class Question:
    user: str
    query: str
    conversation_id: str | None = None
    inputs: Mapping[str, Any] = field(default_factory=dict)
    files: tuple[Attachment, ...] = ()
    # Correlates the Dify run with the WeCom message (Dify's X-Trace-Id: [A-Za-z0-9_-]{1,128}).
    trace_id: str = ""


@dataclass(frozen=True, slots=True)
class AnswerFile:
    kind: str  # "image", "document", ...
    url: str


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    conversation_id: str
    message_id: str = ""
    files: tuple[AnswerFile, ...] = ()
    # Non-empty when the app's run paused for a person (a chatflow Human Input node): names the node (its
    # title, else its id). The turn ends here; `text` is whatever the app said before pausing (maybe "").
    needs_human_input: str = ""


@dataclass(frozen=True, slots=True)
class AppInfo:
    name: str
    mode: str  # "chat" | "agent-chat" | "advanced-chat" | "agent" | ...

    @property
    def streaming_only(self) -> bool:
        return self.mode in ("agent-chat", "agent")


@dataclass(frozen=True, slots=True)
class AppParameters:
    """What `GET /parameters` tells about the app, reduced to what the bot uses."""

    opening_statement: str = ""
    suggested_questions: tuple[str, ...] = ()
    speech_to_text: bool = False
    file_upload: Mapping[str, Any] = field(default_factory=dict)
    # Size limits in MB as Dify reports them (system_parameters); 0 when not reported.
    file_size_limit_mb: int = 0
    image_file_size_limit_mb: int = 0
    audio_file_size_limit_mb: int = 0
    # Output moderation (`sensitive_word_avoidance`): a `message_replace` may still replace the whole answer.
    moderation_enabled: bool = False
    # "Suggested questions after answer": `GET /messages/{id}/suggested` has questions to offer.
    suggestions_after_answer: bool = False
    # The app's declared input variables (`user_input_form`), in its order.
    input_form: tuple[FormField, ...] = ()
