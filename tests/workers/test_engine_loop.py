"""The engine loop's own full collections (``workers.engine_loop.FullCollections``)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from workers.engine_loop import FullCollections


@pytest.fixture
def full_collections_seen() -> Iterator[list[int]]:
    seen: list[int] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info["generation"] == 2:
            seen.append(1)

    gc.callbacks.append(on_gc)
    try:
        yield seen
    finally:
        gc.callbacks.remove(on_gc)


def test_idle_after_work_collects_once_and_idle_alone_never(
    full_collections_seen: list[int],
) -> None:
    fc = FullCollections(busy_interval_s=3600, idle_interval_s=0)
    assert not fc.turn(busy=False)  # nothing ran yet: nothing to collect
    assert not any(fc.turn(busy=True) for _ in range(100))  # busy, interval not reached
    assert not full_collections_seen
    assert fc.turn(busy=False)  # the loop went idle after work
    assert len(full_collections_seen) == 1 and fc.count == 1
    assert not fc.turn(busy=False)  # still idle, no work since
    assert fc.turn(busy=True) is False and fc.turn(busy=False)
    assert fc.count == 2 and len(full_collections_seen) == 2


def test_idle_collections_are_spaced_by_the_idle_interval() -> None:
    fc = FullCollections(busy_interval_s=3600, idle_interval_s=3600)
    fc.turn(busy=True)
    assert not fc.turn(busy=False)  # work since, but the last one was just now
    assert fc.worked  # kept for when the interval has passed


def test_continuous_work_still_collects_every_busy_interval(
    full_collections_seen: list[int],
) -> None:
    fc = FullCollections(busy_interval_s=0, idle_interval_s=3600)
    assert fc.turn(busy=True) and fc.turn(busy=True)
    assert len(full_collections_seen) == 2
    # ...and the work of that turn still counts for the next idle moment.
    assert fc.worked


def test_the_engine_process_runs_with_automatic_gc_off(tiny_checkpoint: Any) -> None:
    """What the engine process does after loading (``_start_engine``, run here in the test
    process on the real engine): startup's objects frozen out of every collection, automatic
    collection off (the loop's ``FullCollections`` alone collects)."""
    from workers.engine_loop import _start_engine
    from workers.settings import DEFAULT_ENGINE_FACTORY

    options = {"device": "cpu", "kv_cache_tokens": 256}
    try:
        engine = _start_engine(DEFAULT_ENGINE_FACTORY, str(tiny_checkpoint("llama")), options, 1)
        assert not gc.isenabled()
        assert gc.get_freeze_count() > 10_000  # torch, transformers, the model
        assert engine.capacity().total_kv_tokens >= 256
    finally:
        gc.unfreeze()
        gc.enable()
