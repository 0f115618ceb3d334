"""Intake's pieces: prompt building with the model's chat template, id salvage for errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from producer.contract.codec import make_envelope, salvage_request_id
from producer.contract.limits import DEFAULT_LIMITS
from workers.prompts import PromptBuilder


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
