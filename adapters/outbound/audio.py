"""`AudioConverter` with ffmpeg: WeCom voice (AMR, 8 kHz) → 16 kHz mono WAV or MP3 for Dify's speech to text.

Speech models behind Dify do not take AMR (specs/dify-api.md §6), so voice is transcoded first. ffmpeg runs as
an asyncio subprocess on temporary files (never on the event loop's thread, never longer than `timeout_s`).
The binary is the one on PATH, else the one the `imageio-ffmpeg` package ships.
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
from domain.media import MediaBlob, bare_type, extension_for_type, sniff_type

log = logging.getLogger("kfdify.audio")

# 60 s of 16 kHz mono 16-bit WAV is 1.9 MB; anything far beyond means the input was not a voice message.
MAX_OUTPUT_BYTES = 30 * 1024 * 1024  # Dify's /audio-to-text limit (spec §6)
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
        self, *, executable: str | None, timeout_s: float = 30.0, output_format: str = "wav"
    ) -> None:
        if output_format not in _FORMATS:
            raise ValueError(f"output_format must be one of {sorted(_FORMATS)}, not {output_format!r}")
        self._exe = executable
        self._timeout_s = timeout_s
        self._format = output_format

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
        args, content_type, extension = _FORMATS[self._format]
        source_ext = extension_for_type(sniff_type(audio.data) or bare_type(audio.content_type)) or "bin"
        with tempfile.TemporaryDirectory(prefix="kfdify-voice-") as workdir:
            source = Path(workdir) / f"in.{source_ext}"
            target = Path(workdir) / f"out.{extension}"
            await asyncio.to_thread(source.write_bytes, audio.data)
            command = [
                self._exe,
                "-nostdin",
                "-hide_banner",
                "-loglevel",
                "error",
                "-y",
                "-i",
                str(source),
                "-vn",
                "-ac",
                "1",
                "-ar",
                "16000",
                *args,
                str(target),
            ]
            await self._run(command)
            size = await asyncio.to_thread(lambda: target.stat().st_size if target.exists() else -1)
            if size <= 0:
                raise AudioConversionError("ffmpeg produced no audio")
            if size > MAX_OUTPUT_BYTES:
                raise AudioConversionError(f"converted audio is {size} bytes, more than Dify takes")
            data = await asyncio.to_thread(target.read_bytes)
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
