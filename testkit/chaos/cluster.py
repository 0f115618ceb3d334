"""Real processes for chaos runs: one Redis (AOF with a chosen fsync policy) and worker
processes, each talking to Redis through a TCP proxy of its own, so one worker can be cut
off or slowed while the others are not.

Workers are ``python -m workers.cli worker`` in their own session (their engine process
with them), so a fault hits the whole worker: ``kill9`` (SIGKILL to the session),
``pause`` / ``resume`` (SIGSTOP / SIGCONT), ``kill_host`` (SIGKILL to one of its other host
processes, which ends the worker), and ``respawn`` once it is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from producer.contract.keys import Keys
from testkit.chaos.proxy import TcpProxy
from workers.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny"
KEYS = Keys()


@dataclass
class ChaosWorker:
    """One worker process and the proxy it reaches Redis through."""

    name: str
    proxy: TcpProxy
    args: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _log: Any = field(default=None, repr=False)

    def start(self) -> None:
        self.starts += 1
        self._log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "--log-level", "INFO", "worker", *self.args,
             "--redis", self.proxy.url, "--name", self.name],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_all(self, sig: int) -> None:
        """``sig`` to the worker's whole session (host processes and engine)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def kill9(self) -> None:
        self.signal_all(signal.SIGCONT)  # a paused worker is killed too
        self.signal_all(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.alive:
            self.kill9()
        else:
            self.signal_all(signal.SIGKILL)  # its engine, if it outlived the host
        if self._log is not None:
            self._log.close()


class ChaosCluster:
    """Redis + ``workers`` worker processes on a tiny checkpoint (see the module doc)."""

    def __init__(
        self,
        checkpoint: Path,
        log_dir: Path,
        *,
        workers: int = 2,
        appendfsync: str | None = "always",
        host_processes: int = 1,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.redis_server = RedisServer(appendfsync=appendfsync)
        self.appendfsync = appendfsync
        self.log_dir = log_dir
        args = [
            "--model", str(checkpoint), "--served-model-name", MODEL, "--device", "cpu",
            "--kv-cache-tokens", "4096", "--max-num-seqs", "16", "--torch-threads", "1",
            "--grace-period-s", "2", "--host-processes", str(host_processes), *extra_args,
        ]  # fmt: skip
        self._args = args
        self._count = workers
        self.workers: dict[str, ChaosWorker] = {}

    @property
    def url(self) -> str:
        return self.redis_server.url

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self, timeout_s: float = 300.0) -> ChaosCluster:
        self.redis_server.start()
        for i in range(self._count):
            name = f"cw{i}"
            proxy = TcpProxy(self.redis_server.host, self.redis_server.port).start()
            worker = ChaosWorker(name, proxy, self._args, self.log_dir / f"{name}.log")
            self.workers[name] = worker
            worker.start()
        self.wait_ready(list(self.workers), timeout_s)
        return self

    def wait_ready(self, names: list[str], timeout_s: float = 300.0) -> None:
        """Until each of ``names`` beats (a worker beats once it serves)."""
        deadline = time.monotonic() + timeout_s
        r = self.client()
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(redis.RedisError):
                    if all(r.exists(KEYS.heartbeat(n)) for n in names):
                        return
                dead = [n for n in names if not self.workers[n].alive]
                if dead:
                    raise RuntimeError(f"{dead} exited at start:\n{self.workers[dead[0]].log()}")
                time.sleep(0.2)
        finally:
            r.close()
        raise TimeoutError(f"workers {names} did not start in {timeout_s} s")

    def host_pid(self, name: str, host: int) -> int | None:
        """The pid of host process ``host`` of worker ``name`` (from its heartbeat)."""
        r = self.client()
        try:
            raw = r.get(KEYS.heartbeat(f"{name}.{host}"))
        finally:
            r.close()
        return None if raw is None else int(json.loads(raw)["pid"])

    def respawn(self, name: str) -> None:
        worker = self.workers[name]
        if worker.alive:
            worker.kill9()
        worker.signal_all(signal.SIGKILL)
        worker.start()

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
            worker.proxy.stop()
        self.redis_server.stop()

    def __enter__(self) -> ChaosCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
