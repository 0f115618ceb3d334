"""Gateway fixtures: real Redis, a real worker on the tiny checkpoint, and ``chatq gateway``
processes on free ports (the real CLI, uvicorn, httptools).

One worker and one gateway serve the whole package (the database is flushed once, at its
start, never per test): tests keep apart by creating their own tenants and keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.workers.conftest import MODEL, REPO, ThreadWorker, tiny_settings
from workers.redis_server import RedisServer, free_port

__all__ = ["MODEL"]


class GatewayProcess:
    """``python -m workers.cli gateway ...`` on a free port, stopped by ``stop()``."""

    def __init__(
        self,
        redis_url: str,
        log_path: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workers.cli",
                "gateway",
                "--redis",
                redis_url,
                "--port",
                str(self.port),
                *extra,
            ],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 60.0) -> GatewayProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/ready", timeout=1.0).status_code == 200:
                    return self
            time.sleep(0.1)
        raise TimeoutError(f"gateway not ready: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="package")
def module_redis(redis_server: RedisServer) -> str:
    """The session's Redis, flushed once for the gateway tests."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="package")
def gw_worker(module_redis: str, tiny_checkpoint: Callable[..., Path]) -> Iterator[ThreadWorker]:
    """A worker serving ``tiny`` for the gateway tests."""
    handle = ThreadWorker(tiny_settings(module_redis, tiny_checkpoint("llama"), name="gw-tw"))
    handle.start()
    yield handle
    handle.stop()


@pytest.fixture(scope="package")
def spawn_gateway(
    module_redis: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., GatewayProcess]]:
    """Factory: a ready gateway process with the given extra CLI options."""
    started: list[GatewayProcess] = []
    log_dir = tmp_path_factory.mktemp("gateway-logs")

    def spawn(
        *extra: str, env: dict[str, str] | None = None, wait: bool = True, port: int | None = None
    ) -> GatewayProcess:
        log = log_dir / f"gateway-{len(started)}.log"
        gp = GatewayProcess(module_redis, log, *extra, env=env, port=port)
        started.append(gp)
        return gp.wait_ready() if wait else gp

    yield spawn
    for gp in started:
        gp.stop()


@pytest.fixture(scope="module")
def gateway(
    gw_worker: ThreadWorker, spawn_gateway: Callable[..., GatewayProcess]
) -> GatewayProcess:
    """One gateway for the package (anonymous requests allowed: tests still use keys)."""
    return spawn_gateway("--allow-anonymous")


def create_key(redis_url: str, tenant: str, **limits: int) -> str:
    """A new API key for ``tenant`` through the real CLI (``chatq keys create``)."""
    args = [
        sys.executable,
        "-m",
        "workers.cli",
        "keys",
        "--redis",
        redis_url,
        "create",
        "--tenant",
        tenant,
    ]
    for name, value in limits.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def wait_until(check: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval_s)


async def async_wait_until(check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)
