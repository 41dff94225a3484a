"""A real memcached on a free loopback port for tests: start, stop, kill, pause, restart on the same port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import IO

import pytest

INSTALL_HINT = "memcached binary not found; install memcached: apt-get install -y memcached"
START_TIMEOUT_S = 5.0


def memcached_binary() -> str:
    """The memcached executable. Missing: a clear error under CI (env CI set), a skip elsewhere."""
    for candidate in (shutil.which("memcached"), "/usr/bin/memcached", "/usr/sbin/memcached"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    if os.environ.get("CI"):
        raise RuntimeError(INSTALL_HINT)
    pytest.skip(INSTALL_HINT)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MemcachedProcess:
    """One memcached process (`-l 127.0.0.1 -p PORT -U 0 -m 64`). Use `start_memcached()` to get one."""

    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self.host = "127.0.0.1"
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def server(self) -> tuple[str, int]:
        """(host, port), as MemcachedStateStore(servers=...) wants it."""
        return (self.host, self.port)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        command = [self.binary, "-l", self.host, "-p", str(self.port), "-U", "0", "-m", "64"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command += ["-u", "root"]  # memcached refuses to run as root without naming the user
        # A file, not a pipe: nobody reads stderr while it runs, and a full pipe would stall the server.
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._stderr)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                stderr = self._reap()
                raise RuntimeError(f"memcached on port {self.port} exited at start: {stderr}")
            if self._accepts_connections():
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(
            f"memcached on port {self.port} did not accept connections within {START_TIMEOUT_S} s"
        )

    def stop(self) -> None:
        """Terminate (SIGTERM) and wait; kill if it does not exit within 5 s."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-conversation, as in a crash."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
        self._reap()

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel but nothing answers (a hung server).

        Returns once every thread of the server has stopped. kill(SIGSTOP) only queues the signal and wakes
        one thread, which then stops the others; until it has run, a worker thread may still answer a
        request, which is how a test that expected no answer got one on a loaded machine."""
        if self.running:
            assert self._process is not None
            self._process.send_signal(signal.SIGSTOP)
            self._wait_for_threads(stopped=True)

    def _wait_for_threads(self, *, stopped: bool) -> None:
        """Wait until every thread of the process is stopped (or none is), as /proc tells (Linux)."""
        assert self._process is not None
        tasks = Path(f"/proc/{self._process.pid}/task")
        if not tasks.is_dir():  # no procfs: nothing to wait on
            return
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return
            with suppress(FileNotFoundError):
                states = [_thread_state(task / "stat") for task in tasks.iterdir()]
                if all((state in "tT") == stopped for state in states if state):
                    return
            time.sleep(0.001)
        raise RuntimeError(f"memcached pid {self._process.pid} did not {'stop' if stopped else 'resume'}")

    def resume(self) -> None:
        """SIGCONT; returns once every thread runs again."""
        if self.running:
            assert self._process is not None
            self._process.send_signal(signal.SIGCONT)
            self._wait_for_threads(stopped=False)

    def restart(self) -> None:
        """Stop if running, then start again on the same port (empty, as after a real restart)."""
        self.stop()
        self.start()

    def _reap(self) -> str:
        assert self._process is not None and self._stderr is not None
        process, self._process = self._process, None
        stderr_file, self._stderr = self._stderr, None
        process.wait()
        with stderr_file:
            stderr_file.seek(0)
            return stderr_file.read().decode(errors="replace").strip()

    def _accepts_connections(self) -> bool:
        """True once *our* process answers on the port (not another server that already held it)."""
        assert self._process is not None
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as conn:
                conn.sendall(b"stats\r\n")
                reply = b""
                while not reply.endswith(b"END\r\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        return False
                    reply += chunk
        except OSError:
            return False
        return f"STAT pid {self._process.pid}\r\n".encode() in reply

    def __enter__(self) -> MemcachedProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _thread_state(stat: Path) -> str:
    """The state letter of /proc/PID/task/TID/stat ("" when the thread is gone)."""
    try:
        text = stat.read_text()
    except OSError:
        return ""
    # "tid (comm) S ...": comm may hold spaces and parentheses, so split after the last ")".
    return text.rpartition(")")[2].split()[0]


def start_memcached(*, attempts: int = 3) -> MemcachedProcess:
    """A running memcached on a free port (a few tries, in case another process grabs the port first)."""
    binary = memcached_binary()
    last_error: RuntimeError | None = None
    for _ in range(attempts):
        process = MemcachedProcess(binary, free_port())
        try:
            process.start()
        except RuntimeError as exc:
            last_error = exc
            continue
        return process
    assert last_error is not None
    raise last_error
