"""Log probabilities in results: the types, their msgpack form, encode beside decode.

A request that sets ``params.logprobs`` (0 to 20: how many alternatives per token) gets,
for each generated token, the token's log probability under the model (its raw
distribution: before temperature, penalties, bias or masks, as OpenAI and vLLM report it)
and the ``params.logprobs`` most likely tokens of that step, best first. Chunks carry the
entries of their ``tokens``; the ``done`` result carries one per generated token. Each
entry is a map shaped as OpenAI's ``ChatCompletionTokenLogprob``::

    {token: str, logprob: float, bytes: [int], top_logprobs: [{token, logprob, bytes}]}

``bytes`` are the token's own UTF-8 bytes (a token may hold part of a character, whose
``token`` text then shows U+FFFD); a log probability too small for a float is
:data:`MIN_LOGPROB`, as OpenAI writes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a step: its text, log probability, UTF-8 bytes."""

    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability and the most likely tokens at its step (best
    first; empty when ``params.logprobs`` is 0)."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top_logprobs: tuple[TopLogprob, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """The entry's msgpack map (``dataclasses.asdict``'s shape, built directly)."""
        return {
            "token": self.token,
            "logprob": self.logprob,
            "bytes": list(self.bytes),
            "top_logprobs": [
                {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)}
                for t in self.top_logprobs
            ],
        }


def finite_logprob(value: float) -> float:
    """``value``, or :data:`MIN_LOGPROB` for -inf / NaN (JSON has no infinities)."""
    return value if math.isfinite(value) and value > MIN_LOGPROB else MIN_LOGPROB


def logprobs_wire(entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    return [e.to_wire() for e in entries]


# Raised by the reader for a bad field: (field path, message) → exception.
Bad = Callable[[str, str], Exception]


def logprobs_from_wire(raw: object, bad: Bad, name: str = "logprobs") -> tuple[TokenLogprob, ...]:
    """Entries from their msgpack form; ``bad(path, message)`` for the first defect."""
    if not isinstance(raw, list):
        raise bad(name, "must be a list")
    out = []
    for i, item in enumerate(raw):
        at = f"{name}[{i}]"
        token, logprob, data = _token_fields(item, bad, at)
        tops = item.get("top_logprobs", [])
        if not isinstance(tops, list):
            raise bad(f"{at}.top_logprobs", "must be a list")
        top = tuple(
            TopLogprob(*_token_fields(t, bad, f"{at}.top_logprobs[{j}]"))
            for j, t in enumerate(tops)
        )
        out.append(TokenLogprob(token, logprob, data, top))
    return tuple(out)


def _token_fields(item: object, bad: Bad, at: str) -> tuple[str, float, tuple[int, ...]]:
    if not isinstance(item, dict):
        raise bad(at, "must be a map")
    token, logprob, data = item.get("token"), item.get("logprob"), item.get("bytes")
    if not isinstance(token, str):
        raise bad(f"{at}.token", "must be a string")
    if (
        isinstance(logprob, bool)
        or not isinstance(logprob, int | float)
        or not math.isfinite(logprob)
        or logprob > 0
    ):
        raise bad(f"{at}.logprob", "must be a finite number <= 0")
    if not isinstance(data, list):
        raise bad(f"{at}.bytes", "must be a list of byte values")
    for j, b in enumerate(data):
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < 256:
            raise bad(f"{at}.bytes[{j}]", "must be a byte value (0-255)")
    return token, float(logprob), tuple(data)
