"""Incremental detokenization with stop strings, for one request.

Byte-level BPE and SentencePiece tokens do not map one-to-one onto characters: a multi-byte
character can span several tokens (its pieces decode to U+FFFD until complete) and a
tokenizer may change how a token renders depending on its neighbours. So, as vLLM does,
decode a short window twice: ``ids[prefix:read]`` (text already emitted) and
``ids[prefix:]``; the difference is new text, emitted only once it does not end in U+FFFD.
The window starts with a few prompt tokens so the first generated token renders with its
context (a leading space stays a space).

Stop strings: the text is searched for any stop string across the boundary of each delta;
on a hit the text is cut before it. While a stop string could still be forming, the last
``max(len(stop)) - 1`` characters are held back from streaming, so chunks never contain
text that the final answer drops: joined chunks always equal the final text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT = "\ufffd"


class TokenDecoder(Protocol):
    """What we need from a tokenizer: ``tokenizers.Tokenizer`` and HF tokenizers both fit."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def fast_decoder(tokenizer: Any) -> TokenDecoder:
    """The Rust ``tokenizers.Tokenizer`` behind an HF fast tokenizer (no Python overhead)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if backend is not None else tokenizer  # type: ignore[no-any-return]


class ContextTexts:
    """Decoded text of prompt-context windows, shared by the requests of one worker.

    The first generated token is decoded after its prompt's last few tokens, and chat
    prompts mostly end alike (``<|im_end|>\n<|im_start|>assistant\n``), so the window's
    own text (the first of that token's two decodes) is nearly always known. Exact: the
    same ids decode to the same text. Bounded: emptied when full."""

    MAX_ENTRIES = 4096

    def __init__(self, decoder: TokenDecoder) -> None:
        self.decoder = decoder
        self._texts: dict[tuple[int, ...], str] = {}

    def text(self, ids: list[int]) -> str:
        key = tuple(ids)
        text = self._texts.get(key)
        if text is None:
            text = self.decoder.decode(ids, skip_special_tokens=True)
            if len(self._texts) >= self.MAX_ENTRIES:
                self._texts.clear()
            self._texts[key] = text
        return text


class IncrementalDetokenizer:
    """One request's token ids turned into text as they come, with its stop strings."""

    def __init__(
        self,
        decoder: TokenDecoder,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        context_texts: ContextTexts | None = None,
    ) -> None:
        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._decoder = decoder
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        # For the first token's prefix decode (None: decode it like any other).
        self._context_texts = context_texts if context_texts is not None and context else None
        self._stop = tuple(s for s in stop if s) if stop else ()
        self._holdback = max(map(len, self._stop), default=1) - 1
        self.text = ""  # the answer so far (cut at a stop string)
        self.num_tokens = 0  # generated tokens seen
        self.stopped = False  # a stop string matched
        self._streamed = 0  # characters of ``text`` already handed out as deltas

    def push(self, new_ids: Sequence[int]) -> bool:
        """Add generated tokens; returns True when a stop string matched (stop generating)."""
        if self.stopped:
            return True
        for token in new_ids:
            self.num_tokens += 1
            self._ids.append(int(token))
            if self._context_texts is not None:  # the first token: prefix = the context
                prefix_text = self._context_texts.text(self._ids[: self._read_offset])
                self._context_texts = None
            else:
                prefix_text = self._decoder.decode(
                    self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True
                )
            full_text = self._decoder.decode(
                self._ids[self._prefix_offset :], skip_special_tokens=True
            )
            if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT):
                delta = full_text[len(prefix_text) :]
                self._prefix_offset = self._read_offset
                self._read_offset = len(self._ids)
                if self._append(delta):
                    return True
        return False

    def _append(self, delta: str) -> bool:
        start = max(0, len(self.text) - self._holdback)
        self.text += delta
        if not self._stop:
            return False
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped

    def resume(self, generated_ids: Sequence[int], streamed_chars: int) -> bool:
        """Continue after tokens another worker generated, of whose text ``streamed_chars``
        characters were streamed already; True when a stop string is among them."""
        stopped = self.push(generated_ids)
        if streamed_chars > len(self.text):
            # Only an ended answer streams its held-back bytes (as U+FFFD, by ``flush``): an
            # answer of a request for n > 1 that ended there. Flush them here too, or the
            # final chunk streams them a second time.
            self.flush()
        self._streamed = min(streamed_chars, len(self.text))
        return stopped

    def flush(self) -> str:
        """At the end: decode any held-back bytes (an incomplete character stays U+FFFD)."""
        if not self.stopped and self._read_offset < len(self._ids):
            prefix_text = self._decoder.decode(
                self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True
            )
            full_text = self._decoder.decode(
                self._ids[self._prefix_offset :], skip_special_tokens=True
            )
            if len(full_text) > len(prefix_text):
                self._read_offset = len(self._ids)
                self._append(full_text[len(prefix_text) :])
        return self.text

    def stream_delta(self, final: bool = False) -> str:
        """Text not yet streamed that is safe to stream (everything, once ``final``)."""
        end = len(self.text)
        if not final and not self.stopped:
            end = max(self._streamed, end - self._holdback)
        delta = self.text[self._streamed : end]
        self._streamed = end
        return delta
