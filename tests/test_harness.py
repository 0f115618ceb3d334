"""The harness itself: private Redis answers and is clean per test; checkpoints load."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from testkit.chaos.cluster import ChaosCluster
from testkit.chaos.nemesis import ROLLBACK, Fault, Nemesis
from tests.workers.conftest import ThreadWorker, tiny_settings


async def test_redis_is_private_and_clean(redis_client: Any) -> None:
    assert await redis_client.ping()
    assert await redis_client.dbsize() == 0
    await redis_client.set("chatq:test", "1")
    info = await redis_client.info("server")
    assert int(info["redis_version"].split(".")[0]) >= 7


async def test_database_flushed_between_tests(redis_client: Any) -> None:
    assert await redis_client.get("chatq:test") is None


def test_tiny_checkpoints_load_in_transformers(tiny_checkpoint: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for arch in ("llama", "qwen2", "qwen3"):
        path = tiny_checkpoint(arch)
        assert (path / "model.safetensors").exists()
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok.apply_chat_template(
            [{"role": "user", "content": "Where is my order?"}], add_generation_prompt=True
        )
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        out = model(torch.tensor([ids]))
        assert out.logits.shape == (1, len(ids), model.config.vocab_size)
        assert tok.decode(tok("Hello, refund 42!")["input_ids"]) == "Hello, refund 42!"


def test_a_background_thread_that_raises_fails_the_test(pytester: Any, monkeypatch: Any) -> None:
    """tests/conftest.py's hook: an exception in a helper thread fails the test phase it
    happened in (with the thread's traceback), even though the test itself passed."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    pytester.makeconftest(
        "from tests.conftest import (pytest_configure, pytest_runtest_call,\n"
        "    pytest_runtest_setup, pytest_runtest_teardown)\n"
    )
    pytester.makepyfile(
        """
        import threading

        def test_thread_raises():
            t = threading.Thread(target=lambda: 1 / 0, name="helper")
            t.start()
            t.join()

        def test_quiet_thread():
            t = threading.Thread(target=lambda: None)
            t.start()
            t.join()
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:threadexception", "-p", "no:cacheprovider", "-q"
    )  # fmt: skip
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*a background thread raised*", "*ZeroDivisionError*"])


def test_thread_worker_stop_reports_how_the_worker_ended(tmp_path: Path) -> None:
    """``ThreadWorker.stop`` raises when the worker raised (here: a model directory with no
    checkpoint in it, found when the worker runs), so a worker that died mid-module fails its
    fixture instead of passing silently."""
    settings = tiny_settings("redis://127.0.0.1:1/0", tmp_path)
    handle = ThreadWorker(settings)
    with pytest.raises(RuntimeError, match="failed to start"):
        handle.start(timeout_s=30)
    with pytest.raises(RuntimeError, match="not a usable checkpoint"):
        handle.stop()


async def test_a_rollback_keeps_what_was_acknowledged_before_applying_s_only(
    tmp_path: Path,
) -> None:
    """The nemesis's Redis rollback keeps every write acknowledged before ``applying_s``. A
    write that waited behind its SAVE is acknowledged before ``began_s`` is noted (here it
    is made right after the SAVE, before the nemesis's thread returns, as a loaded CPU can
    order it) and is erased all the same: "acknowledged before began_s" is no test of "in
    the snapshot" (the rollback test used it and, under load, demanded an answer for a
    request the rollback had erased)."""
    cluster = ChaosCluster(tmp_path, tmp_path, workers=0).start()  # Redis with its AOF only
    r = cluster.client()
    late_acked_s: list[float] = []

    class WriteRightAfterTheSnapshot(Nemesis):
        def _begin(self, fault: Fault) -> None:
            super()._begin(fault)  # the SAVE has run: the snapshot is taken
            r.set("late", 1)
            late_acked_s.append(time.monotonic())

    try:
        r.set("early", 1)
        early_acked_s = time.monotonic()
        rollback = Fault(ROLLBACK, "redis", at_s=0.0, duration_s=0.1)
        await WriteRightAfterTheSnapshot(cluster).run([rollback])
        assert rollback.applying_s is not None and rollback.began_s is not None
        assert early_acked_s < rollback.applying_s < late_acked_s[0] < rollback.began_s
        after = cluster.client()
        try:
            assert after.get("early") == b"1"
            assert after.get("late") is None
        finally:
            after.close()
    finally:
        r.close()
        cluster.close()
