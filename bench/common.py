"""Shared pieces: constants, /proc readings, child processes (service, baseline, fakes, memcached)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"

# Any valid pair works; these are the official vector A credentials the tests use too.
TOKEN = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo"
AES_KEY = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"
CORP_ID = "wwbenchcorp0001"
CORP_SECRET = "bench-corp-secret-0001"
DIFY_KEY = "app-bench-key"
ADMIN_TOKEN = "bench-admin-token"
KF = "wkBENCHKF0001"
HOST = "127.0.0.1"

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The uvicorn settings bootstrap.serve() uses (loop and http left on "auto"); the baseline and the fake Dify
# are served with exactly these, so both sides of a ratio run the same server stack.
UVICORN_SETTINGS: dict[str, Any] = {
    "log_config": None,
    "access_log": False,
    "server_header": False,
    "timeout_graceful_shutdown": 10,
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def uvicorn_stack() -> str:
    """What uvicorn's "auto" resolves to in this interpreter (the same for every process we start)."""
    import importlib.util

    import uvicorn

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"uvicorn {uvicorn.__version__}, loop={loop}, http={http}, 1 worker"


# --- /proc ---------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid` (not its children)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        stat = handle.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of `pid`, KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


def self_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


# --- machine -------------------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = "unknown"
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "python": platform.python_version() + f" ({platform.python_implementation()})",
        "os": f"{platform.system()} {platform.release()}",
        "commit": _git("rev-parse", "--short", "HEAD") or "unknown",
        "worktree": "modified" if _git("status", "--porcelain", "--untracked-files=no") else "clean",
        "server": uvicorn_stack(),
    }


def _git(*args: str) -> str:
    # Read-only: --no-optional-locks keeps `status` from refreshing (writing) the index.
    try:
        result = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


# --- child processes -----------------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    """The environment without anything the service would read as configuration."""
    config_keys = {
        "CORP_ID",
        "CORP_SECRET",
        "TOKEN",
        "ENCODING_AES_KEY",
        "DIFY_API_BASE",
        "DIFY_API_KEY",
        "AGENT_ID",
        "DIFY_RESPONSE_MODE",
        "ADMIN_TOKEN",
        "WECOM_API_BASE",
        "LOG_LEVEL",
        "LOG_FORMAT",
    }
    prefixes = ("KFDIFY_", "MEMCACHE_", "SERVER_", "BOT_", "TEXTS_")
    env = {k: v for k, v in os.environ.items() if k not in config_keys and not k.startswith(prefixes)}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    return env


def http_get(url: str, *, headers: dict[str, str] | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post_json(url: str, payload: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
    data = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


class Proc:
    """A child process (a Python server) we start, watch through /proc and stop."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        port: int,
        ready_path: str,
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.extra_env = env or {}
        self.port = port
        self.ready_path = ready_path
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.peak_kib = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> Proc:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, env={**clean_env(), **self.extra_env}, stdout=self._log, stderr=self._log
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
            try:
                status, _ = http_get(self.url + self.ready_path, timeout=0.5)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"{self.name} did not come up in {timeout:.0f} s:\n{self.logs()[-3000:]}")

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def memory(self) -> dict[str, int]:
        mem = memory_kib(self.pid)
        self.peak_kib = max(self.peak_kib, mem.get("VmHWM", 0))
        return mem

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.memory()  # last chance to read VmHWM
            except OSError:
                pass
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None and not self._log.closed:
            self._log.close()

    def logs(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""


def python_proc(
    name: str,
    module_args: list[str],
    *,
    port: int,
    ready_path: str,
    log_dir: Path,
    env: dict[str, str] | None = None,
) -> Proc:
    # sys.executable, not a shim: /proc must see the Python process itself.
    return Proc(
        name, [sys.executable, *module_args], port=port, ready_path=ready_path, log_dir=log_dir, env=env
    )


def write_ini(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@dataclass
class Memcached:
    """A real memcached on a free loopback port (`-m 64`, no UDP)."""

    port: int
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @classmethod
    def start(cls, timeout: float = 5.0) -> Memcached:
        binary = next(
            (
                c
                for c in (shutil.which("memcached"), "/usr/bin/memcached", "/usr/sbin/memcached")
                if c and os.access(c, os.X_OK)
            ),
            None,
        )
        if binary is None:
            raise RuntimeError("memcached not found: apt-get install -y memcached")
        port = free_port()
        command = [binary, "-l", HOST, "-p", str(port), "-U", "0", "-m", "64"]
        if os.geteuid() == 0:
            command += ["-u", "root"]
        stderr = tempfile.TemporaryFile()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                stderr.seek(0)
                raise RuntimeError(f"memcached exited: {stderr.read().decode(errors='replace')}")
            try:
                with socket.create_connection((HOST, port), timeout=0.5) as conn:
                    conn.sendall(b"stats\r\n")
                    if f"STAT pid {proc.pid}\r\n".encode() in conn.recv(8192):
                        return cls(port, proc)
            except OSError:
                pass
            time.sleep(0.02)
        proc.kill()
        raise RuntimeError("memcached did not start")

    def stats(self) -> dict[str, int]:
        """memcached's `stats` counters (commands served, CAS outcomes, ...)."""
        with socket.create_connection((HOST, self.port), timeout=2) as conn:
            conn.sendall(b"stats\r\n")
            reply = b""
            while not reply.endswith(b"END\r\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                reply += chunk
        out: dict[str, int] = {}
        for line in reply.decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "STAT" and parts[2].isdigit():
                out[parts[1]] = int(parts[2])
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
