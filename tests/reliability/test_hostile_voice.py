"""A customer's voice file is hostile input for ffmpeg (issue #13, point 5).

ffmpeg follows what its input names: an HLS playlist sent as "voice" made it read local files, and a small
playlist made it write 125 MB before the size was checked. The converter takes AMR only (by its magic),
forces the input format, allows the `file` protocol only, and bounds the output while ffmpeg runs.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from adapters.outbound.audio import FfmpegAudioConverter
from application.errors import AudioConversionError
from domain.media import MediaBlob
from tests.support import media_samples
from tests.support.http_server import serve

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def ffmpeg() -> str:
    return media_samples.ffmpeg_or_fail()


@pytest.fixture
def internal_server() -> Iterator[tuple[str, list[str]]]:
    """An "internal" HTTP server that logs every request it gets."""
    requests: list[str] = []

    async def anything(request: Request) -> Response:
        requests.append(request.url.path)
        return Response(b"\x00" * 188, media_type="video/mp2t")

    app = Starlette(routes=[Route("/{path:path}", anything)])
    with serve(app) as base:
        yield base, requests


def _recording_wrapper(tmp_path: Path, real: str) -> tuple[str, Path, Path]:
    """An ffmpeg that notes each run and the size of the output ffmpeg left, then exits as ffmpeg did."""
    runs = tmp_path / "runs.log"
    sizes = tmp_path / "sizes.log"
    wrapper = tmp_path / "ffmpeg-wrapper"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'echo run >> "{runs}"\n'
        f'"{real}" "$@"\n'
        "rc=$?\n"
        "for last; do :; done\n"
        f'if [ -f "$last" ]; then wc -c < "$last" >> "{sizes}"; fi\n'
        "exit $rc\n"
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return str(wrapper), runs, sizes


def _playlist(target: str) -> bytes:
    return (
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n"
        f"#EXTINF:10.0,\n{target}\n#EXT-X-ENDLIST\n"
    ).encode()


async def test_an_hls_playlist_is_refused_before_ffmpeg_runs(
    tmp_path: Path, ffmpeg: str, internal_server: tuple[str, list[str]]
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    base, requested = internal_server
    exe, runs, _ = _recording_wrapper(tmp_path, ffmpeg)
    converter = FfmpegAudioConverter(executable=exe, timeout_s=20)

    for playlist in (_playlist(str(secret)), _playlist(f"{base}/segment.ts"), _playlist(f"file://{secret}")):
        with pytest.raises(AudioConversionError, match="not AMR"):
            await converter.to_speech(MediaBlob(playlist, "audio/amr", filename="voice.amr"))

    assert not runs.exists(), "ffmpeg was started on a playlist"
    assert requested == []


async def test_a_playlist_behind_the_amr_magic_names_nothing_ffmpeg_opens(
    tmp_path: Path, ffmpeg: str, internal_server: tuple[str, list[str]]
) -> None:
    # Passes the magic check, so ffmpeg runs: the forced format and protocol list must keep it on the file.
    base, requested = internal_server
    converter = FfmpegAudioConverter(executable=ffmpeg, timeout_s=20)
    disguised = media_samples.AMR_MAGIC + _playlist(f"{base}/segment.ts")

    with pytest.raises(AudioConversionError):
        await converter.to_speech(MediaBlob(disguised, "audio/amr"))

    assert requested == []


async def test_a_valid_amr_still_converts(tmp_path: Path, ffmpeg: str) -> None:
    exe, runs, _ = _recording_wrapper(tmp_path, ffmpeg)
    converter = FfmpegAudioConverter(executable=exe)

    speech = await converter.to_speech(MediaBlob(media_samples.amr_clip(), "audio/amr"))

    assert speech.data.startswith(b"RIFF")
    assert speech.content_type == "audio/wav"
    assert runs.read_text().count("run") == 1


async def test_the_output_cap_holds_while_ffmpeg_writes(tmp_path: Path, ffmpeg: str) -> None:
    cap = 64 * 1024  # about 2 s of 16 kHz speech; the clip converts to about 640 KB
    exe, _, sizes = _recording_wrapper(tmp_path, ffmpeg)
    converter = FfmpegAudioConverter(executable=exe, max_output_bytes=cap, timeout_s=30)

    with pytest.raises(AudioConversionError, match="more than Dify takes"):
        await converter.to_speech(MediaBlob(media_samples.synthetic_amr(20.0), "audio/amr"))

    # What ffmpeg itself left on disk: stopped near the cap (one packet over at most), not 640 KB.
    written = int(sizes.read_text().split()[-1])
    assert cap < written <= cap + 32 * 1024
