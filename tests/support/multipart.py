"""A strict little multipart/form-data reader for the fake servers (Starlette needs python-multipart for
`request.form()`, which the project does not depend on). It keeps every part's own headers, because the
emulated APIs judge uploads by the part's Content-Type, not the file name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


class MultipartError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    data: bytes
    filename: str | None = None  # None: a plain form field
    content_type: str | None = None  # None: the part carried no Content-Type header
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_PARAM = re.compile(r';\s*([a-zA-Z0-9_*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))')


def parse_form(content_type: str, body: bytes) -> list[Part]:
    """The parts of a multipart/form-data body, in order. Raises MultipartError when it is not one."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise MultipartError(f"not multipart/form-data: {content_type!r}")
    match = _BOUNDARY.search(content_type)
    if not match:
        raise MultipartError("no boundary")
    delimiter = b"--" + match.group(1).encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise MultipartError("body does not end with the closing boundary")
    parts: list[Part] = []
    for chunk in chunks[1:-1]:
        if not chunk.startswith(b"\r\n") or not chunk.endswith(b"\r\n"):
            raise MultipartError("part not framed by CRLF")
        head, sep, data = chunk[2:-2].partition(b"\r\n\r\n")
        if not sep:
            raise MultipartError("part without a header/body separator")
        headers: dict[str, str] = {}
        for line in head.decode("utf-8").split("\r\n"):
            name, colon, value = line.partition(":")
            if not colon:
                raise MultipartError(f"bad part header {line!r}")
            headers[name.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        if not disposition.lower().startswith("form-data"):
            raise MultipartError("part without Content-Disposition: form-data")
        params = {
            m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3).strip())
            for m in _PARAM.finditer(disposition)
        }
        if "name" not in params:
            raise MultipartError("part without a name")
        parts.append(
            Part(
                name=params["name"],
                data=data,
                filename=params.get("filename"),
                content_type=headers.get("content-type"),
                headers=headers,
            )
        )
    return parts
