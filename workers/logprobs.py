"""The engine's token logprobs as result entries: each token id named by its text and bytes.

The engine reports ids and log probabilities (:class:`~gpu_engine.outputs.TokenLogprobs`);
results name tokens as OpenAI does, by their text and their own UTF-8 bytes
(:class:`~producer.contract.logprobs.TokenLogprob`). A token's bytes come from its
vocabulary piece: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) spells each byte as one
printable character, SentencePiece's byte fallback as ``<0xAB>``; anything else (added
tokens with spaces, other decoders) is decoded alone and encoded. A token that is part of
a character has that part as bytes and U+FFFD in its text.
"""

from __future__ import annotations

import re
from typing import Any

from gpu_engine.outputs import TokenLogprobs
from producer.contract.logprobs import TokenLogprob, TopLogprob, finite_logprob
from workers.detokenizer import fast_decoder

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenTexts:
    """Token id → (text, UTF-8 bytes), cached: one worker's tokenizer, shared by requests."""

    def __init__(self, tokenizer: Any) -> None:
        self._backend = fast_decoder(tokenizer)
        decoder = getattr(self._backend, "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._alphabet = byte_level_alphabet()
        self._cache: dict[int, tuple[str, tuple[int, ...]]] = {}

    def of(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        found = self._cache.get(token_id)
        if found is None:
            data = self._bytes(token_id)
            found = self._cache[token_id] = (data.decode("utf-8", errors="replace"), tuple(data))
        return found

    def _bytes(self, token_id: int) -> bytes:
        piece = self._piece(token_id)
        if piece is not None:
            if self._byte_level:
                alphabet = self._alphabet
                if all(c in alphabet for c in piece):
                    return bytes(alphabet[c] for c in piece)
            else:
                fallback = _BYTE_FALLBACK.fullmatch(piece)
                if fallback is not None:
                    return bytes([int(fallback.group(1), 16)])
        text: str = self._backend.decode([token_id], skip_special_tokens=False)
        return text.encode("utf-8")

    def _piece(self, token_id: int) -> str | None:
        id_to_token = getattr(self._backend, "id_to_token", None)
        if id_to_token is None:  # an HF tokenizer without a Rust backend
            id_to_token = getattr(self._backend, "convert_ids_to_tokens", None)
        piece = id_to_token(token_id) if id_to_token is not None else None
        return piece if isinstance(piece, str) else None

    def entry(self, token_id: int, lp: TokenLogprobs) -> TokenLogprob:
        """The result entry of a generated token and its step's logprobs."""
        top = []
        for alt_id, alt_logprob in lp.top:
            alt_text, alt_bytes = self.of(alt_id)
            top.append(TopLogprob(alt_text, finite_logprob(alt_logprob), alt_bytes))
        text, data = self.of(token_id)
        return TokenLogprob(text, finite_logprob(lp.logprob), data, tuple(top))
