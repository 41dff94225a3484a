"""Real media bytes for tests: PNG, GIF and PDF written by hand, JPEG and AMR voice made with ffmpeg.

AMR voice clips: WeCom sends voice as AMR-NB. Debian's ffmpeg decodes AMR but has no AMR encoder; the ffmpeg
binary of the `imageio-ffmpeg` package (a test dependency) has `libopencore_amrnb`, so a 440 Hz tone is
encoded with whichever ffmpeg has that encoder (`-f lavfi -i sine=… -ar 8000 -ac 1 -c:a libopencore_amrnb`).
When none has it, `amr_clip` writes a valid AMR-NB file itself: the "#!AMR\\n" magic and 12.2 kbit/s frames
(header byte 0x3C + 31 payload bytes, 20 ms each) with a fixed pseudo-random payload, which every AMR decoder
plays as noise. Voice tests still need *an* ffmpeg to convert the clip: `ffmpeg_or_fail` fails under CI (env
CI set) and skips elsewhere when there is none.
"""

from __future__ import annotations

import functools
import os
import random
import struct
import subprocess
import zlib

import pytest

from adapters.outbound.audio import find_ffmpeg

AMR_MAGIC = b"#!AMR\n"
# The classic 1×1 transparent GIF (43 bytes).
GIF_1X1 = bytes.fromhex(
    "47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b"
)


def png(
    width: int = 16, height: int = 16, rgb: tuple[int, int, int] = (200, 30, 30), *, noise: int = 0
) -> bytes:
    """A valid RGB PNG. `noise` > 0 adds that many pseudo-random bytes of incompressible pixels (to make big
    files: the image grows to hold them)."""
    if noise:
        side = int((noise / 3) ** 0.5) + 1
        width = height = max(width, side)
    rng = random.Random(7)
    rows = []
    for _ in range(height):
        if noise:
            pixels = rng.randbytes(width * 3)
        else:
            pixels = bytes(rgb) * width
        rows.append(b"\x00" + pixels)  # filter type 0 per row
    raw = b"".join(rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 1))
        + chunk(b"IEND", b"")
    )


def pdf(text: str = "Hello kf-dify") -> bytes:
    """A minimal valid one-page PDF showing `text` (ASCII), with a correct xref table."""
    stream = f"BT /F1 24 Tf 72 720 Td ({text}) Tj ET".encode("ascii")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n".encode() + b"0000000000 65535 f \n"
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def synthetic_amr(seconds: float = 1.0, *, seed: int = 3) -> bytes:
    """A valid AMR-NB file (12.2 kbit/s frames) with a fixed pseudo-random payload: decodes as noise."""
    rng = random.Random(seed)
    frames = max(1, int(seconds * 50))
    return AMR_MAGIC + b"".join(bytes([0x3C]) + rng.randbytes(31) for _ in range(frames))


def ffmpeg_candidates() -> list[str]:
    candidates: list[str] = []
    for found in (find_ffmpeg(), _imageio_ffmpeg()):
        if found and found not in candidates:
            candidates.append(found)
    return candidates


def ffmpeg_or_fail() -> str:
    """An ffmpeg for voice tests: under CI its absence is a failure, elsewhere a skip."""
    found = find_ffmpeg()
    if found:
        return found
    message = (
        "no ffmpeg on PATH and no imageio-ffmpeg package: voice cannot be tested (pip install imageio-ffmpeg)"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@functools.cache
def amr_encoder() -> str | None:
    """An ffmpeg that can encode AMR-NB (libopencore_amrnb), if any."""
    for exe in ffmpeg_candidates():
        try:
            listed = subprocess.run(
                [exe, "-hide_banner", "-encoders"], capture_output=True, timeout=30, check=False
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        if b"libopencore_amrnb" in listed:
            return exe
    return None


@functools.cache
def amr_clip(seconds: float = 1.0) -> bytes:
    """A real AMR-NB voice clip (a 440 Hz tone) like the ones WeCom delivers, 8 kHz mono."""
    exe = amr_encoder()
    if exe is None:
        return synthetic_amr(seconds)
    done = subprocess.run(
        [
            exe, "-nostdin", "-hide_banner", "-loglevel", "error",
            "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
            "-ar", "8000", "-ac", "1", "-c:a", "libopencore_amrnb", "-b:a", "12.2k", "-f", "amr", "pipe:1",
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )  # fmt: skip
    assert done.stdout.startswith(AMR_MAGIC), done.stderr[-300:]
    return done.stdout


@functools.cache
def jpeg() -> bytes | None:
    """A real 16×16 JPEG made by ffmpeg's mjpeg encoder (None without an ffmpeg)."""
    for exe in ffmpeg_candidates():
        done = subprocess.run(
            [
                exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "lavfi",
                "-i", "color=c=blue:s=16x16", "-frames:v", "1", "-c:v", "mjpeg", "-f", "image2pipe", "pipe:1",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )  # fmt: skip
        if done.returncode == 0 and done.stdout.startswith(b"\xff\xd8\xff"):
            return done.stdout
    return None


def _imageio_ffmpeg() -> str | None:
    try:
        import imageio_ffmpeg  # type: ignore[import-untyped]

        exe: str = imageio_ffmpeg.get_ffmpeg_exe()
        return exe
    except (ImportError, RuntimeError, OSError):
        return None
