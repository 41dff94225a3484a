"""Logging as operators read it: one line per step, text or JSON, with secrets masked whatever happens.

Every line names the callback it serves (the correlation id) and, while a customer message is handled, the kf
account, customer and msgid (application/log_context.py): call sites do not repeat them. Text from outside
(customer names, Dify errors, file names) cannot forge a line: control characters are escaped.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable

from application.log_context import handled_message
from application.telemetry import correlation_id

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: anything that may end a line.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# What json.dumps(ensure_ascii=False) leaves as it is although a reader may take it for a line end.
_RAW_IN_JSON = re.compile("[\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """`text` on one line: control characters as `\\n`, `\\r`, `\\t`, `\\xNN` or `\\uNNNN`."""
    return _CONTROLS.sub(_escape_one, text)


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _context_fields() -> dict[str, str]:
    context = handled_message.get()
    return context.fields() if context is not None else {}


class RedactSecrets(logging.Filter):
    """Last line of defence: no configured secret ever reaches a log line, even inside an exception."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = correlation_id.get()
        fields = _context_fields()
        record.message_context = fields
        record.context = "".join(f" {name}={value}" for name, value in fields.items())
        if self._secrets:
            message = record.getMessage()
            masked = self._mask(message)
            if masked != message:
                record.msg, record.args = masked, None
            if record.exc_info and record.exc_info[1] is not None:
                formatted = logging.Formatter().formatException(record.exc_info)
                record.exc_text = self._mask(formatted)
        return True


def _fields(record: logging.LogRecord) -> dict[str, str]:
    """The message context of the record (set by RedactSecrets), or of the current task."""
    fields = getattr(record, "message_context", None)
    return fields if isinstance(fields, dict) else _context_fields()


class JsonFormatter(logging.Formatter):
    """One JSON object per line. JSON escapes C0 controls itself; C1 controls and U+2028/2029 are escaped
    here (as `\\uNNNN`, so the decoded fields keep the original text)."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": str(getattr(record, "request_id", "-")),
            **_fields(record),
            "message": record.getMessage(),
        }
        if record.exc_info:
            payload["exception"] = record.exc_text or self.formatException(record.exc_info)
        line = json.dumps(payload, ensure_ascii=False)
        return _RAW_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", line)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s%(context)s] %(message)s"


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT` on one line per record; an exception's traceback follows on lines indented by a tab,
    each escaped, so that no text from outside starts a line of its own."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        record.message = escape_controls(record.getMessage())
        record.context = escape_controls("".join(f" {name}={value}" for name, value in fields.items()))
        record.request_id = escape_controls(str(getattr(record, "request_id", "-")))
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        trace = [record.exc_text] if record.exc_text else []
        if record.stack_info:
            trace.append(self.formatStack(record.stack_info))
        for block in trace:
            line += "".join(f"\n\t{escape_controls(part)}" for part in block.splitlines())
        return line


def configure_logging(*, level: str = "INFO", fmt: str = "text", secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactSecrets(secrets))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every request URL at INFO, and WeCom URLs carry the access token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # markdown-it traces every parser rule at DEBUG.
    logging.getLogger("markdown_it").setLevel(logging.WARNING)
