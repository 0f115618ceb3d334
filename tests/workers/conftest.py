"""Worker fixtures: a real worker (real engine process, tiny checkpoint) on the test Redis.

``tiny_worker`` runs one :class:`workers.worker.Worker` per test module in a background
thread with its own event loop, so tests (each on their own loop) talk to it only through
Redis, like any producer. Tests flush the database (``redis_url``); the worker re-creates
its consumer groups by itself. ``spawn_worker`` starts ``python -m workers.cli worker`` as a
real subprocess (for kill -9 / SIGTERM tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from workers.redis_server import RedisServer
from workers.settings import WorkerSettings
from workers.worker import Worker

MODEL = "tiny"
REPO = Path(__file__).resolve().parents[2]


class ThreadWorker:
    """A Worker on its own loop in a daemon thread."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.worker = Worker(settings)
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name="tiny-worker", daemon=True)

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self.exit_code = self._loop.run_until_complete(self.worker.run(install_signals=False))
        except BaseException as err:
            self.error = err
        finally:
            self._loop.close()

    def start(self, timeout_s: float = 120.0) -> ThreadWorker:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.worker.ready.is_set():
            if not self._thread.is_alive():
                raise RuntimeError(f"worker failed to start: {self.error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("worker did not become ready")
            time.sleep(0.05)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the worker and fail the caller if it did not end clean: still running after
        ``timeout_s``, raised, or exited non-zero (a worker that died mid-module would
        otherwise show only as later tests timing out)."""
        if self._thread.ident is None:
            return  # never started
        if self._loop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed as the worker ended
                self._loop.call_soon_threadsafe(self.worker.stop)
        self._thread.join(timeout_s)
        name = self.settings.name
        if self._thread.is_alive():
            raise TimeoutError(f"worker {name} did not stop within {timeout_s} s")
        if self.error is not None:
            raise RuntimeError(f"worker {name} raised {self.error!r}") from self.error
        if self.exit_code != 0:
            raise RuntimeError(f"worker {name} exited with code {self.exit_code}")

    @property
    def capacity(self) -> Any:
        assert self.worker.engine is not None
        return self.worker.engine.capacity


def tiny_settings(url: str, ckpt: Path, **overrides: Any) -> WorkerSettings:
    base: dict[str, Any] = {
        "model_path": str(ckpt), "redis_url": url, "served_model_name": MODEL,
        "device": "cpu", "kv_cache_tokens": 2048, "max_num_seqs": 4,
        "max_inflight_factor": 1.0, "torch_threads": 1, "grace_period_s": 5.0,
        "max_num_batched_tokens": 512,
    }  # fmt: skip
    base.update(overrides)
    return WorkerSettings(**base)


@pytest.fixture(scope="module")
def tiny_worker(
    redis_server: RedisServer, tiny_checkpoint: Callable[..., Path]
) -> Iterator[ThreadWorker]:
    """One running worker for the module (max 4 concurrent requests, 2048 KV tokens)."""
    handle = ThreadWorker(tiny_settings(redis_server.url, tiny_checkpoint("llama"), name="tw"))
    handle.start()
    yield handle
    handle.stop()


class WorkerProcess:
    """``python -m workers.cli worker ...`` in its own session (killed with its engine)."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "--log-level", "INFO", "worker", *args],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        # The engine child shares the session; make sure it is gone too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


@pytest.fixture
def spawn_worker(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def spawn(url: str, name: str, *extra: str) -> WorkerProcess:
        args = [
            "--model", str(tiny_checkpoint("llama")), "--redis", url, "--name", name,
            "--served-model-name", MODEL, "--device", "cpu", "--kv-cache-tokens", "2048",
            "--max-num-seqs", "8", "--torch-threads", "1", *extra,
        ]  # fmt: skip
        wp = WorkerProcess(args, tmp_path / f"{name}.log")
        started.append(wp)
        return wp

    yield spawn
    for wp in started:
        wp.cleanup()


async def held_by_a_dead_worker(redis_client: Any, env: Any, chunks: Any) -> None:
    """Queue ``env`` (reserved as ENQUEUE reserves it) already taken by a consumer
    ``ghost`` that has no heartbeat and wrote ``chunks`` of a half-finished answer: what a
    worker killed mid-stream leaves behind. One transaction: the ghost takes the entry
    before a live worker can see it, and its chunks are there before anyone could claim it."""
    from producer.contract.codec import encode_envelope
    from producer.contract.keys import GROUP, STREAM_FIELD, Keys
    from producer.contract.reservation import reservation_value
    from producer.contract.results import encode_result

    keys = Keys()
    lane = keys.requests(env.model, env.priority)
    sec, usec = await redis_client.time()
    entry_id = f"{sec * 1000 + usec // 1000 + 1}-0"  # after every entry of this millisecond
    pipe = redis_client.pipeline(transaction=True)
    pipe.set(keys.reservation(env.id), reservation_value(lane, entry_id))
    pipe.xadd(lane, {STREAM_FIELD: encode_envelope(env)}, id=entry_id)
    pipe.xreadgroup(GROUP, "ghost", {lane: ">"}, count=1)
    for chunk in chunks:
        pipe.xadd(keys.result(env.id), encode_result(chunk))
    await pipe.execute()
