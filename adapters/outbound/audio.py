"""`AudioConverter` with ffmpeg: WeCom voice (AMR, 8 kHz) → 16 kHz mono WAV or MP3 for Dify's speech to text.

Speech models behind Dify do not take AMR (docs/dify.md, audio-to-text), so voice is transcoded first. ffmpeg
runs as an asyncio subprocess on temporary files (never on the event loop's thread, never longer than
`timeout_s`). The binary is the one on PATH, else the one the `imageio-ffmpeg` package ships.

The voice file comes from the customer and is hostile until checked. ffmpeg probes its input and follows
what it finds: an HLS playlist or a concat list names other files and URLs, which ffmpeg would read. So:
- only AMR is taken, recognised by its magic (`#!AMR\n`); anything else is refused before ffmpeg starts;
- the input format is forced (`-f amr`), so no probing, and only the `file` protocol is allowed;
- the output is bounded while ffmpeg runs (`-fs` size, `-t` duration), not only after it exits, and is read
  back in chunks, never more than the cap.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import struct
import tempfile
from pathlib import Path

from application.errors import AudioConversionError
from domain.media import MediaBlob

log = logging.getLogger("kfdify.audio")

# 60 s of 16 kHz mono 16-bit WAV is 1.9 MB; anything far beyond means the input was not a voice message.
MAX_OUTPUT_BYTES = 30 * 1024 * 1024  # Dify's /audio-to-text limit (docs/dify.md)
# WeCom voice messages last at most 60 s; the margin is for clock drift in the encoder, not longer speech.
MAX_SECONDS = 120.0
AMR_MAGIC = b"#!AMR\n"
_READ_CHUNK = 256 * 1024
_STDERR_TAIL = 400
_FORMATS = {
    # format → (ffmpeg arguments, content type Dify accepts, extension)
    "wav": (["-c:a", "pcm_s16le", "-f", "wav"], "audio/wav", "wav"),
    "mp3": (["-c:a", "libmp3lame", "-b:a", "32k", "-f", "mp3"], "audio/mp3", "mp3"),
}


def find_ffmpeg(configured: str = "") -> str | None:
    """The ffmpeg to use: `configured` (a path or a name on PATH), else `ffmpeg` on PATH, else the binary of
    the imageio-ffmpeg package. None when there is none."""
    if configured:
        found = shutil.which(configured)
        return found if found else (configured if os.access(configured, os.X_OK) else None)
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg  # type: ignore[import-untyped]

        exe: str = imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError, OSError):
        return None
    return exe if exe and os.access(exe, os.X_OK) else None


class FfmpegAudioConverter:
    """Runs one short ffmpeg per voice message. Construction does no I/O beyond locating the binary."""

    def __init__(
        self,
        *,
        executable: str | None,
        timeout_s: float = 30.0,
        output_format: str = "wav",
        max_output_bytes: int = MAX_OUTPUT_BYTES,
        max_seconds: float = MAX_SECONDS,
    ) -> None:
        if output_format not in _FORMATS:
            raise ValueError(f"output_format must be one of {sorted(_FORMATS)}, not {output_format!r}")
        if max_output_bytes <= 0 or max_seconds <= 0:
            raise ValueError("max_output_bytes and max_seconds must be positive")
        self._exe = executable
        self._timeout_s = timeout_s
        self._format = output_format
        self._max_output_bytes = max_output_bytes
        self._max_seconds = max_seconds

    @classmethod
    def located(
        cls, *, configured: str = "", timeout_s: float = 30.0, output_format: str = "wav"
    ) -> FfmpegAudioConverter:
        return cls(executable=find_ffmpeg(configured), timeout_s=timeout_s, output_format=output_format)

    @property
    def available(self) -> bool:
        return self._exe is not None

    @property
    def executable(self) -> str | None:
        return self._exe

    async def to_speech(self, audio: MediaBlob) -> MediaBlob:
        if self._exe is None:
            raise AudioConversionError("no ffmpeg: install it, or the imageio-ffmpeg package")
        input_format = input_format_of(audio.data)
        if input_format is None:
            # Not even ffmpeg sees it: a playlist or list file would make ffmpeg open what it names.
            raise AudioConversionError("voice is not AMR (no #!AMR magic); refused before conversion")
        args, content_type, extension = _FORMATS[self._format]
        with tempfile.TemporaryDirectory(prefix="kfdify-voice-") as workdir:
            source = Path(workdir) / f"in.{input_format}"
            target = Path(workdir) / f"out.{extension}"
            await asyncio.to_thread(source.write_bytes, audio.data)
            command = [
                self._exe,
                "-nostdin",
                "-hide_banner",
                "-loglevel",
                "error",
                "-protocol_whitelist",
                "file",
                "-f",
                input_format,
                "-i",
                str(source),
                "-vn",
                "-sn",
                "-dn",
                "-ac",
                "1",
                "-ar",
                "16000",
                "-t",
                f"{self._max_seconds:g}",
                # ffmpeg stops writing once the file reaches this size: one byte over the cap, so that a
                # stopped conversion is told apart from one that fits exactly.
                "-fs",
                str(self._max_output_bytes + 1),
                *args,
                "-y",
                str(target),
            ]
            await self._run(command)
            data = await asyncio.to_thread(_read_capped, target, self._max_output_bytes)
        if not data:
            raise AudioConversionError("ffmpeg produced no audio")
        return MediaBlob(data=data, content_type=content_type, filename=f"voice.{extension}")

    async def _run(self, command: list[str]) -> None:
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                # Its own process group, so a timeout kills whatever it started too (a wrapper script's
                # children would otherwise hold the stderr pipe open).
                start_new_session=True,
            )
        except OSError as exc:
            raise AudioConversionError(f"cannot start ffmpeg: {exc}") from exc
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), self._timeout_s)
        except TimeoutError:
            _kill_group(process)
            await process.wait()
            raise AudioConversionError(f"ffmpeg took longer than {self._timeout_s:g} s") from None
        except asyncio.CancelledError:
            _kill_group(process)
            await asyncio.shield(process.wait())
            raise
        if process.returncode != 0:
            tail = stderr.decode("utf-8", errors="replace").strip()[-_STDERR_TAIL:]
            raise AudioConversionError(f"ffmpeg exited with {process.returncode}: {tail}")


def input_format_of(data: bytes) -> str | None:
    """The ffmpeg demuxer for a customer's voice file, by its bytes alone; None for one we do not take."""
    return "amr" if data.startswith(AMR_MAGIC) else None


def _read_capped(path: Path, cap: int) -> bytes:
    """The file's bytes, read in chunks; AudioConversionError as soon as it holds more than `cap`."""
    chunks: list[bytes] = []
    size = 0
    try:
        with path.open("rb") as file:
            while chunk := file.read(_READ_CHUNK):
                size += len(chunk)
                if size > cap:
                    raise AudioConversionError(f"converted audio is over {cap} bytes, more than Dify takes")
                chunks.append(chunk)
    except FileNotFoundError:
        return b""
    return b"".join(chunks)


def _kill_group(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()


class FakeAudioConverter:
    """For unit tests: turns any input into a short silent 16 kHz WAV; can be told to fail or be missing."""

    def __init__(self, *, available: bool = True) -> None:
        self._available = available
        self.converted: list[MediaBlob] = []
        self.fail_with: AudioConversionError | None = None

    @property
    def available(self) -> bool:
        return self._available

    async def to_speech(self, audio: MediaBlob) -> MediaBlob:
        await asyncio.sleep(0)
        if not self._available:
            raise AudioConversionError("no converter")
        if self.fail_with is not None:
            raise self.fail_with
        self.converted.append(audio)
        return MediaBlob(data=silent_wav(0.1), content_type="audio/wav", filename="voice.wav")


def silent_wav(seconds: float, *, rate: int = 16000) -> bytes:
    """A valid mono 16-bit PCM WAV of silence."""
    frames = int(seconds * rate)
    data = b"\x00\x00" * frames
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    return header + fmt + b"data" + struct.pack("<I", len(data)) + data
