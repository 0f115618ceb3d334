"""Shared fixtures: a private redis-server per session, clean databases, tiny checkpoints."""

from __future__ import annotations

import os
import threading
import traceback
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit.checkpoints import build_checkpoint
from workers.redis_server import RedisServer

pytest_plugins = ["pytester"]  # tests/test_harness.py runs an inner pytest

# Most tests queue requests before a worker starts, or with none at all (the queue layer
# alone): their clients opt in to queueing for unserved models. The refusal itself is tested
# with clients that say allow_unserved=False (tests/producer/contract/test_enqueue_served.py).
os.environ.setdefault("CHATQ_ALLOW_UNSERVED", "1")


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


# Exceptions raised in helper threads (a fake worker answering, a produce loop): pytest's own
# plugin would only warn, and the test would fail later, if at all, as a timeout far from the
# cause. Ours records every one and fails the test phase during which it happened, with the
# thread's traceback. (pyproject's addopts turns pytest's plugin off, `-p no:threadexception`,
# so that the two do not swap the hook under each other.)
_thread_errors: list[str] = []
_thread_errors_lock = threading.Lock()


def _record_thread_error(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    where = args.thread.name if args.thread is not None else "?"
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    with _thread_errors_lock:
        _thread_errors.append(f"exception in thread {where}:\n{text}")


def pytest_configure(config: pytest.Config) -> None:
    threading.excepthook = _record_thread_error


def _fail_on_thread_errors() -> Generator[None, Any, Any]:
    # One raised between phases, or during a phase that failed anyway, is charged to the
    # next phase that ends.
    result = yield
    with _thread_errors_lock:
        errors, _thread_errors[:] = list(_thread_errors), []
    if errors:
        pytest.fail("a background thread raised:\n" + "\n".join(errors), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _fail_on_thread_errors())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _fail_on_thread_errors())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _fail_on_thread_errors())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the whole session (free port, data in a temp dir)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """URL of a freshly flushed database on the private server."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Any]:
    """An asyncio client on the clean database, closed after the test."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``tiny_checkpoint("qwen3", **config_overrides) -> Path`` (cached per args)."""
    cache: dict[tuple[Any, ...], Path] = {}

    def make(arch: str = "llama", **overrides: Any) -> Path:
        key = (arch, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"ckpt-{arch}")
            cache[key] = build_checkpoint(path, arch, **overrides)
        return cache[key]

    return make
