"""Media rules as pure functions: types, names, what the AI app accepts, size limits."""

from __future__ import annotations

import pytest

from domain.media import (
    MB,
    MediaBlob,
    UploadPolicy,
    dify_file_kind,
    dify_size_limit,
    extension_of,
    filename_from_disposition,
    image_type,
    megabytes,
    safe_filename,
    sniff_type,
)
from tests.support import media_samples


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (media_samples.png(), "image/png"),
        (media_samples.GIF_1X1, "image/gif"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg"),
        (media_samples.pdf(), "application/pdf"),
        (media_samples.synthetic_amr(), "audio/amr"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "audio/wav"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"ID3\x04\x00", "audio/mp3"),
        (b"hello", ""),
    ],
)
def test_sniffing_reads_the_magic_bytes(data: bytes, expected: str) -> None:
    assert sniff_type(data) == expected


def test_the_bytes_win_over_a_wrong_header_for_images() -> None:
    assert image_type(MediaBlob(media_samples.png(), "image/jpeg")) == "image/png"
    assert image_type(MediaBlob(media_samples.png(), "application/octet-stream")) == "image/png"
    assert image_type(MediaBlob(media_samples.pdf(), "image/png")) == ""


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ('attachment; filename="MEDIA_ID.jpg"', "MEDIA_ID.jpg"),
        ("attachment; filename=plain.pdf", "plain.pdf"),
        ("attachment; filename=\"a.pdf\"; filename*=UTF-8''%E6%8A%A5%E5%91%8A.pdf", "报告.pdf"),
        ("attachment; filename*=utf-8''%E8%AF%B4%E6%98%8E%20%281%29.docx", "说明 (1).docx"),
        ('attachment; filename="say \\"hi\\".txt"', 'say "hi".txt'),
        ("attachment", ""),
        ("", ""),
    ],
)
def test_file_names_come_from_content_disposition(header: str, name: str) -> None:
    assert filename_from_disposition(header) == name


def test_safe_file_names_have_no_paths_or_control_characters() -> None:
    assert safe_filename("../../etc/passwd", fallback="x") == "passwd"
    assert safe_filename("a\\b\\报告.pdf", fallback="x") == "报告.pdf"
    assert safe_filename('bad:name*?"<>|\x00.txt', fallback="x") == "bad_name_.txt"
    assert safe_filename("", fallback="MEDIA1", extension="png") == "MEDIA1.png"
    assert safe_filename("photo", fallback="x", extension="jpg") == "photo.jpg"
    assert safe_filename("photo.JPG", fallback="x", extension="jpg") == "photo.JPG"


def test_long_names_are_cut_to_200_characters_keeping_the_extension() -> None:
    name = safe_filename("长" * 300 + ".pdf", fallback="x")

    assert len(name) == 200 and name.endswith(".pdf")


def test_extensions() -> None:
    assert extension_of("a.b.PDF") == "pdf"
    assert extension_of(".bashrc") == ""
    assert extension_of("noext") == ""
    assert dify_file_kind("JPG") == "image"
    assert dify_file_kind("docx") == "document"
    assert dify_file_kind("amr") == "audio"
    assert dify_file_kind("zip") == "custom"


class TestUploadPolicy:
    def test_nothing_configured_takes_nothing(self) -> None:
        policy = UploadPolicy.of({})

        assert not policy.enabled and not policy.images and not policy.accepts_files
        assert policy.kind_for("png") is None

    def test_the_legacy_image_shape(self) -> None:
        policy = UploadPolicy.of({"image": {"enabled": True, "transfer_methods": ["local_file"]}})

        assert policy.images
        assert policy.kind_for("png") == "image"
        assert policy.kind_for("pdf") is None
        assert policy.accepted_names() == ["图片"]

    def test_images_only_by_url_cannot_take_uploads(self) -> None:
        policy = UploadPolicy.of({"image": {"enabled": True, "transfer_methods": ["remote_url"]}})

        assert not policy.images

    def test_the_current_shape_with_documents(self) -> None:
        policy = UploadPolicy.of(
            {
                "enabled": True,
                "allowed_file_types": ["document"],
                "allowed_file_upload_methods": ["local_file", "remote_url"],
            }
        )

        assert not policy.images and policy.accepts_files
        assert policy.kind_for("PDF") == "document"
        assert policy.kind_for("zip") is None
        assert "PDF" in policy.accepted_names() and "图片" not in policy.accepted_names()

    def test_custom_extensions(self) -> None:
        policy = UploadPolicy.of(
            {"enabled": True, "allowed_file_types": ["custom"], "allowed_file_extensions": [".ZIP", "png"]}
        )

        assert policy.kind_for("zip") == "custom"
        assert policy.images  # a custom image extension still lets images through
        assert policy.accepted_names() == ["图片", "ZIP"]

    def test_disabled_current_shape_takes_nothing(self) -> None:
        policy = UploadPolicy.of({"enabled": False, "allowed_file_types": ["image", "document"]})

        assert not policy.enabled


def test_size_limits_default_like_dify() -> None:
    assert dify_size_limit("image") == 10 * MB
    assert dify_size_limit("document") == 15 * MB
    assert dify_size_limit("image", image_mb=3) == 3 * MB
    assert dify_size_limit("custom", file_mb=20) == 20 * MB
    assert (megabytes(2 * MB), megabytes(MB + MB // 2), megabytes(15 * MB)) == ("2", "1.5", "15")


def test_the_hand_written_pdf_has_a_correct_xref_table() -> None:
    data = media_samples.pdf()
    xref_at = int(data.rsplit(b"startxref\n", 1)[1].split(b"\n", 1)[0])
    table = data[xref_at:].split(b"trailer", 1)[0].split(b"\n")[3:-1]

    assert data[xref_at:].startswith(b"xref\n0 6\n")
    for number, line in enumerate(table, start=1):
        offset = int(line.split()[0])
        assert data[offset:].startswith(f"{number} 0 obj".encode())
