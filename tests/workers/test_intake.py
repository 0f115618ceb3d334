"""Intake's pieces: prompt building with the model's chat template, id salvage for errors;
and a real worker's intake under a backlog."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from producer.client import ChatClient
from producer.contract.codec import make_envelope, salvage_request_id
from producer.contract.keys import GROUP, Keys
from producer.contract.limits import DEFAULT_LIMITS
from tests.workers.conftest import MODEL, ThreadWorker, tiny_settings
from workers.prompts import PromptBuilder

KEYS = Keys()
USER = [{"role": "user", "content": "Where is my order?"}]
BACKLOG = 2000  # requests queued before the worker starts (two submit_many calls)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Callable[..., Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint("qwen2"))


def _env(*turns: tuple[str, str]) -> Any:
    return make_envelope([{"role": r, "content": c} for r, c in turns], model="m")


def test_prompts_match_apply_chat_template_token_for_token(tokenizer: Any) -> None:
    builder = PromptBuilder(tokenizer)
    envs = [
        _env(("user", "Where is my order #12345?")),
        _env(
            ("system", "Be brief."),
            ("user", "Refund, please! 🙏"),
            ("assistant", "Sure."),
            ("user", "Thanks"),
        ),
    ]
    got = builder.batch(envs)
    for env, ids in zip(envs, got, strict=True):
        msgs = [{"role": m.role, "content": m.content} for m in env.messages]
        want = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if hasattr(want, "keys") else want
        assert ids == list(want)
    text = tokenizer.decode(got[0])
    assert text.endswith("<|im_start|>assistant\n") and "Where is my order #12345?" in text


def test_a_template_error_fails_only_its_own_request(tiny_checkpoint: Callable[..., Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("qwen2"))
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('tool turns are not supported') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    out = PromptBuilder(tok).batch(
        [_env(("user", "hi")), _env(("tool", "{}")), _env(("user", "bye"))]
    )
    assert isinstance(out[0], list) and isinstance(out[2], list)
    assert isinstance(out[1], Exception) and "tool turns" in str(out[1])


def test_missing_chat_template_falls_back_to_chatml(tiny_checkpoint: Callable[..., Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("qwen2"))
    tok.chat_template = None
    (ids,) = PromptBuilder(tok).batch([_env(("user", "hello"))])
    assert isinstance(ids, list)
    assert tok.decode(ids) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_salvage_request_id() -> None:
    good = make_envelope([{"role": "user", "content": "x"}], model="m", request_id="abc-1")
    wire = good.to_wire()
    assert salvage_request_id(msgpack.packb({**wire, "v": 7}), DEFAULT_LIMITS) == "abc-1"
    huge = {**wire, "messages": [{"role": "user", "content": "y" * (2 << 20)}]}
    assert salvage_request_id(msgpack.packb(huge), DEFAULT_LIMITS) == "abc-1"
    assert salvage_request_id(msgpack.packb({**wire, "id": "bad id!"}), DEFAULT_LIMITS) is None
    assert salvage_request_id(b"\xc1garbage", DEFAULT_LIMITS) is None
    assert salvage_request_id(msgpack.packb([1, 2]), DEFAULT_LIMITS) is None
    assert salvage_request_id(None, DEFAULT_LIMITS) is None


async def test_a_worker_whose_every_pull_is_full_still_reconciles_on_time(
    redis_server: Any, redis_client: Any, tiny_checkpoint: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Under a backlog every round's pull comes back full and starts the next one; reconcile
    used to wait for a round with no pull in flight, i.e. for the backlog to be pulled. An
    entry made pending on the worker behind its back (a lost XREADGROUP reply) must be
    re-handled while the backlog is still being pulled. One entry per pull and room for
    every request keep each round full (production: 256 per pull, a large engine)."""
    import workers.intake

    monkeypatch.setattr(workers.intake, "MAX_PULL_PER_ROUND", 1)
    settings = tiny_settings(
        redis_server.url, tiny_checkpoint("llama"), name="tw-full", max_num_seqs=8,
        max_inflight_factor=1000.0, headroom_tokens=10**8, reconcile_interval_s=0.1,
    )  # fmt: skip
    async with ChatClient(redis_server.url, allow_unserved=True) as client:
        ids = [
            rid for _ in range(2)
            for rid in await client.submit_many([USER] * (BACKLOG // 2), model=MODEL, max_tokens=1)
        ]  # fmt: skip
    handle = ThreadWorker(settings).start()
    try:
        async with ChatClient(redis_server.url) as client:
            # The next undelivered entry, pending on the worker's consumer without its knowing.
            lane = KEYS.requests(MODEL, "normal")
            taken = await redis_client.xreadgroup(GROUP, "tw-full", {lane: ">"}, count=1)
            assert taken and taken[0][1], "the backlog was pulled before the test took one"
            metrics = handle.worker.metrics
            pulled_at_reconcile = await _pulled_when_reconciled(metrics, timeout_s=120)
            await client.results_many(ids, timeout_s=180)
    finally:
        handle.stop()
    # Without the fix it is BACKLOG - 1: nothing was reconciled until the backlog was pulled.
    assert pulled_at_reconcile < BACKLOG // 2, pulled_at_reconcile


async def _pulled_when_reconciled(metrics: Any, timeout_s: float) -> int:
    """The worker's count of pulled entries when it first reconciles one."""
    for _ in range(int(timeout_s / 0.002)):
        pulled = metrics.pulled
        if metrics.reconciled:
            return int(pulled)
        await asyncio.sleep(0.002)
    raise AssertionError("the worker never reconciled the entry")
