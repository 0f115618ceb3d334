"""Incremental detokenization with a real byte-level BPE tokenizer: multi-byte characters,
stop strings, and streamed deltas that always join to the final text."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from workers.detokenizer import ContextTexts, IncrementalDetokenizer, fast_decoder


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Callable[..., Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _run(
    tok: Any, text: str, stop: tuple[str, ...] = ()
) -> tuple[IncrementalDetokenizer, list[str]]:
    prompt = _ids(tok, "<|im_start|>assistant\n")
    detok = IncrementalDetokenizer(fast_decoder(tok), prompt, stop)
    deltas = []
    for token in _ids(tok, text):
        if detok.push([token]):
            break
        deltas.append(detok.stream_delta())
    detok.flush()
    deltas.append(detok.stream_delta(final=True))
    return detok, deltas


@pytest.mark.parametrize(
    "text",
    [
        "Your order #12345 ships Monday.",
        "Grüße aus Köln — 東京 🚚📦 ok",  # multi-byte characters split across byte tokens
        " leading space and trailing ",
        "😀",
    ],
)
def test_deltas_join_to_exact_text_and_never_show_partial_characters(
    tokenizer: Any, text: str
) -> None:
    detok, deltas = _run(tokenizer, text)
    assert detok.text == text
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert detok.num_tokens == len(_ids(tokenizer, text))


def test_stop_string_cuts_text_and_is_never_streamed(tokenizer: Any) -> None:
    text = "Thank you for contacting customer support. Is there anything else?"
    detok, deltas = _run(tokenizer, text, stop=("customer",))
    assert detok.stopped
    assert detok.text == "Thank you for contacting "
    assert "".join(deltas) == detok.text
    assert not any("cust" in d for d in deltas)


def test_earliest_of_several_stop_strings_wins_across_token_boundaries(tokenizer: Any) -> None:
    text = "To reset your password, open the login page."
    detok, _ = _run(tokenizer, text, stop=("login", "sword,"))
    assert detok.text == "To reset your pas"


def test_special_tokens_are_skipped(tokenizer: Any) -> None:
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    detok = IncrementalDetokenizer(fast_decoder(tokenizer), [], ())
    detok.push([*_ids(tokenizer, "Hello!"), eos])
    assert detok.flush() == "Hello!"
    assert detok.num_tokens == len(_ids(tokenizer, "Hello!")) + 1


def test_cached_context_text_gives_the_same_deltas(tokenizer: Any) -> None:
    """The first token's prefix decode from the shared cache: same text, same deltas."""
    decoder = fast_decoder(tokenizer)
    texts = ContextTexts(decoder)
    for prompt_text in ["<|im_start|>assistant\n", "Grüße 東", "<|im_start|>assistant\n", "x"]:
        for answer in ["Your order ships.", " 🚚📦", "東京", "a"]:
            prompt = _ids(tokenizer, prompt_text)
            plain = IncrementalDetokenizer(decoder, prompt, ("ship",))
            cached = IncrementalDetokenizer(decoder, prompt, ("ship",), texts)
            for token in _ids(tokenizer, answer):
                assert plain.push([token]) == cached.push([token])
                assert plain.stream_delta() == cached.stream_delta()
            assert plain.flush() == cached.flush()
    assert len(texts._texts) == 3  # one entry per distinct context window


def _streamed_by_one_worker(tok: Any, ids: list[int], prompt: list[int]) -> str:
    """The deltas one worker streams for an answer of ``ids`` that ends there."""
    detok = IncrementalDetokenizer(fast_decoder(tok), prompt)
    deltas = []
    for token in ids:
        detok.push([token])
        deltas.append(detok.stream_delta())
    detok.flush()
    return "".join(deltas) + detok.stream_delta(final=True)


@pytest.mark.parametrize("ended", [True, False])
def test_a_resumed_answer_ending_mid_character_streams_its_text_once(
    tokenizer: Any, ended: bool
) -> None:
    """An answer whose last token leaves a character incomplete, taken over by another
    worker: when the first worker had ended it (its final chunk streamed the held bytes as
    U+FFFD), the resumed side's final delta is empty; when it had not, the held bytes are
    still to come. Either way the streamed text joins to the final text (a bug streamed
    the U+FFFD twice)."""
    prompt = _ids(tokenizer, "<|im_start|>assistant\n")
    ids = _ids(tokenizer, "Order 4東")[:-1]  # the last byte of 東 left out
    if ended:
        streamed = _streamed_by_one_worker(tokenizer, ids, prompt)
        assert streamed.endswith("\ufffd")
    else:
        streamed = "Order 4"
    detok = IncrementalDetokenizer(fast_decoder(tokenizer), prompt)
    assert not detok.resume(ids, len(streamed))
    streamed += detok.stream_delta()
    final = detok.flush()
    streamed += detok.stream_delta(final=True)
    assert streamed == final
    assert final.endswith("4\ufffd") and not final.endswith("\ufffd\ufffd")
