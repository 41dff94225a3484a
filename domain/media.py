"""Media in the bot's words: downloaded bytes, uploaded files, and the rules both sides put on them.

Pure functions of bytes, names and settings (stdlib only). Limits come from docs/wecom-kf.md §5.2 and §7.4
and docs/dify.md §5–§7.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

MB = 1024 * 1024

# WeCom delivers bigger media as a text hint instead (spec wecom-kf §5.2).
WECOM_INCOMING_CAPS: Mapping[str, int] = {"image": 2 * MB, "voice": 2 * MB, "video": 10 * MB, "file": 20 * MB}
# `media/upload` limits (spec wecom-kf §7.4); every file must be larger than 5 bytes.
WECOM_UPLOAD_CAPS: Mapping[str, int] = {"image": 10 * MB, "voice": 2 * MB, "video": 10 * MB, "file": 20 * MB}
WECOM_UPLOAD_MIN_BYTES = 6
WECOM_UPLOAD_IMAGE_TYPES = frozenset({"image/jpeg", "image/png"})

# Dify's defaults when /parameters does not report system_parameters (spec dify-api §5.1).
DIFY_DEFAULT_FILE_LIMIT_MB = 15
DIFY_DEFAULT_IMAGE_LIMIT_MB = 10
DIFY_DEFAULT_AUDIO_LIMIT_MB = 50
DIFY_SPEECH_LIMIT_BYTES = 30 * MB  # /audio-to-text, hard-coded in Dify (spec dify-api §6)

# Dify's extension lists (spec dify-api §5.1): they decide the size category and the detected file type.
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "svg"})
VIDEO_EXTENSIONS = frozenset({"mp4", "mov", "mpeg", "webm"})
AUDIO_EXTENSIONS = frozenset({"mp3", "m4a", "wav", "amr", "mpga"})
DOCUMENT_EXTENSIONS = frozenset(
    {"txt", "markdown", "md", "mdx", "pdf", "html", "htm", "xlsx", "xls", "docx", "csv", "vtt", "properties"}
)
# Part types /audio-to-text accepts in every version seen (spec dify-api §6); audio/mpeg and audio/x-wav
# are refused by newer Dify, which is why the type is always set explicitly.
SPEECH_CONTENT_TYPES = frozenset({"audio/mp3", "audio/wav", "audio/m4a", "audio/mpga", "audio/amr"})

_EXTENSION_BY_TYPE: Mapping[str, str] = {
    "image/jpeg": "jpg",
    "image/jpg": "jpg",
    "image/pjpeg": "jpg",
    "image/png": "png",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/svg+xml": "svg",
    "audio/amr": "amr",
    "audio/mp3": "mp3",
    "audio/mpeg": "mp3",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/m4a": "m4a",
    "audio/x-m4a": "m4a",
    "video/mp4": "mp4",
    "application/pdf": "pdf",
    "text/plain": "txt",
    "text/markdown": "md",
    "text/html": "html",
    "text/csv": "csv",
    "text/vtt": "vtt",
    "application/msword": "doc",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "application/vnd.ms-excel": "xls",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx",
    "application/vnd.ms-powerpoint": "ppt",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": "pptx",
    "application/json": "json",
    "application/zip": "zip",
}
_TYPE_BY_EXTENSION: Mapping[str, str] = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "gif": "image/gif",
    "webp": "image/webp",
    "svg": "image/svg+xml",
    "amr": "audio/amr",
    "mp3": "audio/mp3",
    "wav": "audio/wav",
    "m4a": "audio/m4a",
    "mp4": "video/mp4",
    "pdf": "application/pdf",
    "txt": "text/plain",
    "md": "text/markdown",
    "markdown": "text/markdown",
    "html": "text/html",
    "htm": "text/html",
    "csv": "text/csv",
    "vtt": "text/vtt",
    "doc": "application/msword",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "xls": "application/vnd.ms-excel",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "ppt": "application/vnd.ms-powerpoint",
    "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "json": "application/json",
    "zip": "application/zip",
}
MAX_FILENAME_CHARS = 200  # Dify truncates longer names (spec dify-api §5.1)
_KINDS = frozenset({"image", "document", "audio", "video", "custom"})


@dataclass(frozen=True, slots=True)
class MediaBlob:
    """Downloaded media: the bytes, their type, and the file name the sender gave (or "")."""

    data: bytes
    content_type: str
    filename: str = ""

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class UploadedFile:
    """A file the AI app holds for one user, to be referenced by a question."""

    id: str
    name: str
    size: int
    extension: str = ""
    mime_type: str = ""


# --- types, names, sniffing --------------------------------------------------------------------------------


def bare_type(content_type: str) -> str:
    """`image/png; charset=x` → `image/png` (lower case)."""
    return content_type.split(";", 1)[0].strip().lower()


def extension_of(filename: str) -> str:
    """The extension without the dot, lower case ("" when none)."""
    name = filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    stem, dot, ext = name.rpartition(".")
    return ext.lower() if dot and stem and ext.isascii() and ext.isalnum() else ""


def extension_for_type(content_type: str) -> str:
    return _EXTENSION_BY_TYPE.get(bare_type(content_type), "")


def type_for_extension(extension: str) -> str:
    return _TYPE_BY_EXTENSION.get(extension.lower().lstrip("."), "")


def sniff_type(data: bytes) -> str:
    """The content type the bytes themselves announce ("" when they announce none we know)."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"RIFF") and data[8:12] == b"WAVE":
        return "audio/wav"
    if head.startswith(b"#!AMR\n"):
        return "audio/amr"
    if head.startswith(b"%PDF-"):
        return "application/pdf"
    if head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "audio/mp3"
    return ""


def image_type(blob: MediaBlob) -> str:
    """The image type of `blob`, trusting the bytes over the header ("" when it is no image we know)."""
    sniffed = sniff_type(blob.data)
    if sniffed.startswith("image/"):
        return sniffed
    declared = bare_type(blob.content_type)
    return declared if declared.startswith("image/") and not sniffed else ""


_UNSAFE_NAME = re.compile(r'[\\/:*?"<>|\x00-\x1f\x7f]+')


def safe_filename(name: str, *, fallback: str, extension: str = "") -> str:
    """A file name Dify and WeCom accept: no path separators or control characters, at most 200 characters,
    ending in `extension` when one is given and the name lacks it."""
    name = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_NAME.sub("_", name).strip(" .") or _UNSAFE_NAME.sub("_", fallback)
    if extension and extension_of(name) != extension.lower():
        name = f"{name}.{extension}"
    if len(name) > MAX_FILENAME_CHARS:
        ext = extension_of(name)
        keep = MAX_FILENAME_CHARS - (len(ext) + 1 if ext else 0)
        name = f"{name[:keep]}.{ext}" if ext else name[:MAX_FILENAME_CHARS]
    return name


def filename_from_disposition(header: str) -> str:
    """The file name in a Content-Disposition header: RFC 5987 `filename*=` first, else `filename=`."""
    star = re.search(r"filename\*\s*=\s*([^']*)'[^']*'([^;]+)", header, re.IGNORECASE)
    if star:
        charset = star.group(1).strip() or "utf-8"
        try:
            return unquote(star.group(2).strip().strip('"'), encoding=charset, errors="strict")
        except (LookupError, UnicodeDecodeError):
            pass
    plain = re.search(r'filename\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]+))', header, re.IGNORECASE)
    if not plain:
        return ""
    value = plain.group(1) if plain.group(1) is not None else plain.group(2).strip()
    return value.replace('\\"', '"')


# --- what the AI app accepts (Dify's file_upload settings) --------------------------------------------------


def dify_file_kind(extension: str) -> str:
    """Dify's file type for an extension: image, document, audio, video or custom (spec dify-api §5.4 #3)."""
    ext = extension.lower().lstrip(".")
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in DOCUMENT_EXTENSIONS:
        return "document"
    if ext in AUDIO_EXTENSIONS:
        return "audio"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    return "custom"


@dataclass(frozen=True, slots=True)
class UploadPolicy:
    """What the app's File Upload feature lets a question carry (GET /parameters → file_upload)."""

    enabled: bool = False
    types: frozenset[str] = frozenset()
    extensions: frozenset[str] = frozenset()  # the `custom` bucket, lower case without dots

    @classmethod
    def of(cls, file_upload: Mapping[str, Any]) -> UploadPolicy:
        """Both shapes (spec dify-api §5.4): legacy `{"image": {"enabled": …}}` and current top-level
        `enabled` + `allowed_file_types` + `allowed_file_extensions` (+ upload methods)."""
        types: set[str] = set()
        legacy = file_upload.get("image")
        if isinstance(legacy, Mapping) and legacy.get("enabled") is True:
            if _allows_local_file(legacy.get("transfer_methods")):
                types.add("image")
        extensions: set[str] = set()
        if file_upload.get("enabled") is True and _allows_local_file(
            file_upload.get("allowed_file_upload_methods")
        ):
            allowed = _strings(file_upload.get("allowed_file_types"))
            types.update(t for t in allowed if t in _KINDS)
            if "custom" in types:
                named = _strings(file_upload.get("allowed_file_extensions"))
                extensions = {e.lower().lstrip(".") for e in named}
        extensions.discard("")
        return cls(enabled=bool(types), types=frozenset(types), extensions=frozenset(extensions))

    @property
    def images(self) -> bool:
        return "image" in self.types or bool(self.extensions & IMAGE_EXTENSIONS)

    def kind_for(self, extension: str) -> str | None:
        """The file type to send for a file with this extension, None when the app would refuse it."""
        ext = extension.lower().lstrip(".")
        kind = dify_file_kind(ext)
        if kind in self.types and kind != "custom":
            return kind
        if "custom" in self.types and ext in self.extensions:
            return "custom"
        return None

    @property
    def accepts_files(self) -> bool:
        """Anything a WeCom `file` message could carry: documents, images, or custom extensions."""
        return bool(self.types & {"document", "image", "audio", "video"}) or bool(self.extensions)

    def accepted_names(self) -> list[str]:
        """What to tell a customer the app accepts: "图片" and upper-case extensions, in a stable order."""
        names: list[str] = []
        if self.images:
            names.append("图片")
        extensions: set[str] = set(self.extensions)
        if "document" in self.types:
            extensions |= {"pdf", "docx", "xlsx", "xls", "txt", "md", "csv", "html"}
        extensions -= IMAGE_EXTENSIONS
        names.extend(e.upper() for e in sorted(extensions))
        return names


def _allows_local_file(methods: object) -> bool:
    # Absent or empty means the app did not restrict upload methods.
    values = _strings(methods)
    return not values or "local_file" in values


def _strings(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list | tuple) else []


def dify_size_limit(kind: str, *, file_mb: int = 0, image_mb: int = 0, audio_mb: int = 0) -> int:
    """Bytes Dify accepts for an upload of `kind` (0 from /parameters means "not reported": the default)."""
    if kind == "image":
        return (image_mb or DIFY_DEFAULT_IMAGE_LIMIT_MB) * MB
    if kind == "audio":
        return (audio_mb or DIFY_DEFAULT_AUDIO_LIMIT_MB) * MB
    return (file_mb or DIFY_DEFAULT_FILE_LIMIT_MB) * MB


def megabytes(limit_bytes: int) -> str:
    """A limit as the customer reads it: "2", "1.5"."""
    value = limit_bytes / MB
    return f"{value:.1f}".rstrip("0").rstrip(".") if value < 10 else str(round(value))


def join_names(names: Iterable[str]) -> str:
    return "、".join(names)
