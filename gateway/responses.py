"""OpenAI's response objects (chat.completion, chat.completion.chunk) and SSE framing.

Built as plain dicts and serialised with orjson: these are on every request's path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from producer.calls import ChatResult
from producer.contract.logprobs import TokenLogprob
from producer.contract.results import Choice, Chunk
from producer.contract.tools import ToolCall

SSE_DONE = b"data: [DONE]\n\n"


def completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def usage(result: ChatResult) -> dict[str, Any]:
    u = result.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def choice_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """A choice's ``logprobs`` object: ``content``, one entry per token (OpenAI's
    ``ChatCompletionTokenLogprob``: token, logprob, bytes, top_logprobs)."""
    return {"content": [e.to_wire() for e in entries], "refusal": None}


def completion(
    result: ChatResult, model: str, created_s: int, logprobs: bool = False
) -> dict[str, Any]:
    """A ``chat.completion`` object: one choice per answer (``n``). ``finish_reason`` is
    chatq's: ``stop``, ``length``, ``tool_calls``, or ``deadline`` (the request's deadline
    cut the answer short). ``logprobs``: the request asked for them (else each choice's
    ``logprobs`` is null)."""
    return {
        "id": completion_id(result.id),
        "object": "chat.completion",
        "created": created_s,
        "model": model,
        "choices": [
            {
                "index": c.index,
                "message": message(c),
                "finish_reason": c.finish_reason,
                "logprobs": choice_logprobs(c.logprobs) if logprobs else None,
            }
            for c in result.choices or (_first(result),)
        ],
        "usage": usage(result),
        "system_fingerprint": None,
    }


def _first(result: ChatResult) -> Choice:
    """A result read without its choices (built by hand): its one answer."""
    return Choice(
        0, result.text, result.finish_reason, result.reasoning_content, result.tool_calls,
        result.logprobs,
    )  # fmt: skip


def message(choice: Choice) -> dict[str, Any]:
    """The assistant message: its text (null when it only calls tools, as OpenAI sends
    it), its tool calls, and the model's reasoning apart (``reasoning_content``)."""
    out: dict[str, Any] = {"role": "assistant", "content": choice.text}
    if choice.tool_calls:
        out["content"] = choice.text or None
        out["tool_calls"] = [_call(c) for c in choice.tool_calls]
    if choice.reasoning_content:
        out["reasoning_content"] = choice.reasoning_content
    return out


def _call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    if index is not None:
        out = {"index": index, **out}
    return out


class ChunkWriter:
    """SSE events of one streamed completion (``data: {chunk}\\n\\n`` each), for ``n``
    answers (each chunk names its answer's ``index``). With ``logprobs``, each chunk's
    choice carries its tokens' entries; each answer's finish chunk carries those of tokens
    no chunk did (the last tokens, when they added no text)."""

    def __init__(
        self,
        request_id: str,
        model: str,
        created_s: int,
        include_usage: bool,
        logprobs: bool = False,
        n: int = 1,
    ) -> None:
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.n = n
        self._calls = [0] * n  # tool calls streamed so far, per answer (each call's index)
        self._logprobs_sent = [0] * n  # token entries streamed so far, per answer
        # Every chunk shares these fields; only choices (and usage) differ.
        self._head = {
            "id": completion_id(request_id),
            "object": "chat.completion.chunk",
            "created": created_s,
            "model": model,
            "system_fingerprint": None,
        }

    def _event(self, choices: list[dict[str, Any]], usage_obj: Any = None) -> bytes:
        chunk = {**self._head, "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage_obj
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def role(self) -> bytes:
        """The first chunk of each answer: the assistant role, no text yet (as OpenAI
        sends it)."""
        delta = {"role": "assistant", "content": ""}
        return b"".join(
            self._event([{"index": i, "delta": delta, "finish_reason": None, "logprobs": None}])
            for i in range(self.n)
        )

    def delta(self, text: str) -> bytes:
        delta = {"content": text}
        return self._event([{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}])

    def chunk(self, chunk: Chunk) -> bytes:
        """One result chunk: its reasoning, text and finished tool calls as delta events
        (a whole call in one delta: id, name and all its arguments)."""
        i = chunk.choice if chunk.choice < self.n else 0
        delta: dict[str, Any] = {}
        if chunk.reasoning:
            delta["reasoning_content"] = chunk.reasoning
        if chunk.delta:
            delta["content"] = chunk.delta
        if chunk.tool_calls:
            first = self._calls[i]
            self._calls[i] += len(chunk.tool_calls)
            delta["tool_calls"] = [_call(c, first + k) for k, c in enumerate(chunk.tool_calls)]
        return self._event(
            [{"index": i, "delta": delta, "finish_reason": None,
              "logprobs": self._logprobs(i, chunk.logprobs)}]
        )  # fmt: skip

    def _logprobs(self, i: int, entries: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        self._logprobs_sent[i] += len(entries)
        return choice_logprobs(entries)

    def finish(self, result: ChatResult) -> bytes:
        """Each answer's finish-reason chunk, the usage chunk if asked for, and ``[DONE]``."""
        out = b""
        for c in result.choices or (_first(result),):
            i = c.index if c.index < self.n else 0
            rest = c.logprobs[self._logprobs_sent[i] :] if self.logprobs else ()
            choice = {
                "index": c.index,
                "delta": {},
                "finish_reason": c.finish_reason,
                "logprobs": self._logprobs(i, rest) if rest else None,
            }
            out += self._event([choice])
        if self.include_usage:
            out += self._event([], usage(result))
        return out + SSE_DONE


def sse_error(body: dict[str, Any]) -> bytes:
    """An error after the stream began (the status line is already sent): OpenAI's clients
    raise ``APIError`` for a ``data:`` event carrying ``error``."""
    return b"data: " + orjson.dumps(body) + b"\n\n"


def sse_event(event: str, data: Any, event_id: str | None = None) -> bytes:
    """A named SSE event (the job API's ``chunk`` / ``done`` / ``error``)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\n".encode() + b"data: " + orjson.dumps(data) + b"\n\n"
