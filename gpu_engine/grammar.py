"""Grammar-constrained decoding: one xgrammar matcher per constrained request, and the
token bitmask of a batch (which tokens each row may sample next).

A :class:`~gpu_engine.sequence.StructuredOutput` is compiled once per distinct spec (the
compiler caches it) into a token-level automaton; each request's matcher advances by the
tokens it samples. The engine fills a step's bitmask on the host while the device runs that
step's forward pass (see ``LLMEngine.pipelined_step``); :func:`apply_bitmask` masks the
logits on the device. xgrammar is imported on the first constrained request, so an engine
that never sees one runs without it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from gpu_engine.sequence import InvalidRequestError, RefusalReason, StructuredOutput

log = logging.getLogger(__name__)

ANY_OBJECT = '{"type": "object"}'

_BITS: dict[torch.device, torch.Tensor] = {}  # 0..31 on each device (one copy each)


class Grammars:
    """Compiled grammars and the live matchers of one engine's constrained requests."""

    def __init__(
        self,
        tokenizer: Any | None,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        pin_memory: bool = False,
    ):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width (may exceed the tokenizer's)
        # The masks cover the tokenizer's ids only: ids past them (a model's vocabulary is
        # often padded) are never allowed on a constrained row (apply_bitmask), and leaving
        # them to xgrammar costs it a special case per id per fill (a 49k-token tokenizer on
        # 152k logits: 20x the fill time).
        self.mask_vocab = vocab_size if tokenizer is None else min(vocab_size, len(tokenizer))
        self.eos_token_ids = list(eos_token_ids)
        self.pin_memory = pin_memory  # a CUDA engine: masks staged in pinned memory
        self._compiler: Any | None = None
        self._batch: Any | None = None  # xgrammar's BatchGrammarMatcher (fills on threads)
        self._matchers: dict[str, Any] = {}
        self._thread: ThreadPoolExecutor | None = None  # bitmask_async's (started on use)
        self.fill_s = 0.0  # host time spent filling masks (for stats / benchmarks)
        self.num_fills = 0
        # [rows, words] int32 host buffer, reused: a step's mask is filled after the step
        # before it was collected, which waited for that step's copy of the buffer.
        self._buffer = torch.empty(0, (self.mask_vocab + 31) // 32, dtype=torch.int32)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._matchers

    def __len__(self) -> int:
        return len(self._matchers)

    def add(
        self, request_id: str, structured: StructuredOutput, generated: Sequence[int] = ()
    ) -> None:
        """Compile ``structured`` (cached per spec) and start a matcher for the request,
        advanced past the tokens it ``generated`` already (a resumed answer). Raises
        ``InvalidRequestError`` (``invalid_params``) for a spec that does not compile, for
        generated tokens the grammar refuses, or when xgrammar or a tokenizer is missing."""
        compiled = self._compile(structured)
        matcher = _xgrammar().GrammarMatcher(compiled)
        for token in generated:
            if not matcher.accept_token(token):
                raise InvalidRequestError(
                    "the resumed tokens do not follow the structured grammar",
                    RefusalReason.INVALID_PARAMS,
                )
        self._matchers[request_id] = matcher

    def accept_batch(self, rows: Sequence[tuple[str, int]]) -> None:
        """Advance each (request id, token) row's matcher by its sampled token, in one call
        into xgrammar (unconstrained requests and ended grammars are skipped). A token the
        matcher refuses can only be a stop token after the grammar ended (ignore_eos) or a
        row sampled after the request finished: both harmless."""
        get = self._matchers.get
        pairs = [(m, t) for rid, t in rows if (m := get(rid)) is not None]
        pairs = [(m, t) for m, t in pairs if not m.is_terminated()]
        if pairs:
            accepted = _xgrammar().BatchGrammarMatcher.batch_accept_token(
                [m for m, _ in pairs], [t for _, t in pairs]
            )
            if not all(accepted):
                log.debug("grammar refused %d of %d tokens", accepted.count(False), len(pairs))

    def release(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def bitmask(self, request_ids: Sequence[str]) -> torch.Tensor | None:
        """[N, ceil(vocab / 32)] int32 on the host (bit ``t % 32`` of word ``t // 32`` set
        when token ``t`` is allowed) for the rows' next tokens; every bit set on rows
        without a matcher (or whose grammar has ended). None if no row is constrained. The
        buffer is reused: the next fill overwrites it."""
        return self._fill(*self._live_rows(request_ids))

    def bitmask_async(self, request_ids: Sequence[str]) -> Future[torch.Tensor | None]:
        """``bitmask`` filled on the grammar thread (xgrammar lets go of the GIL while it
        fills, so the caller's Python runs meanwhile). Until the result is taken, the rows'
        matchers must not accept tokens and no other fill may start."""
        rows = self._live_rows(request_ids)
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="chatq-grammar")
        return self._thread.submit(self._fill, *rows)

    def close(self) -> None:
        """Stop the grammar thread (idempotent)."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    def _live_rows(self, request_ids: Sequence[str]) -> tuple[int, list[Any], list[int]]:
        """(rows, the matchers of the constrained rows whose grammar goes on, their rows)."""
        get = self._matchers.get
        rows = [(i, m) for i, m in enumerate(map(get, request_ids)) if m is not None]
        rows = [(i, m) for i, m in rows if not m.is_terminated()]
        return len(request_ids), [m for _, m in rows], [i for i, _ in rows]

    def _fill(self, n: int, matchers: list[Any], indices: list[int]) -> torch.Tensor | None:
        if not matchers:
            return None
        start = time.perf_counter()
        mask = self._rows(n)
        mask.fill_(-1)  # every bit set: rows without a grammar may pick any token
        if self._batch is None:
            self._batch = _xgrammar().BatchGrammarMatcher(max_threads=fill_threads())
        self._batch.batch_fill_next_token_bitmask(matchers, mask, indices)
        self.fill_s += time.perf_counter() - start
        self.num_fills += 1
        return mask

    def _rows(self, n: int) -> torch.Tensor:
        if self._buffer.shape[0] < n:
            rows = max(n, 2 * self._buffer.shape[0])
            self._buffer = torch.empty(
                rows, self._buffer.shape[1], dtype=torch.int32, pin_memory=self.pin_memory
            )
        return self._buffer[:n]

    def _compile(self, structured: StructuredOutput) -> Any:
        compiler = self._compiler or self._make_compiler()
        try:
            if structured.prefix or structured.suffix:
                return compiler.compile_grammar(_with_affixes(structured))
            if structured.kind == "json":
                if not structured.spec:  # any JSON object, as OpenAI's json_object
                    return compiler.compile_json_schema(
                        ANY_OBJECT, strict_mode=False, any_whitespace=False
                    )
                # Compact JSON: free whitespace lets a small model pad forever.
                return compiler.compile_json_schema(
                    structured.spec, strict_mode=True, any_whitespace=False
                )
            if structured.kind == "regex":
                return compiler.compile_regex(structured.spec)
            return compiler.compile_grammar(structured.spec)
        except (RuntimeError, ValueError, TypeError) as err:
            raise InvalidRequestError(
                f"structured {structured.kind} does not compile: {err}",
                RefusalReason.INVALID_PARAMS,
            ) from None

    def _make_compiler(self) -> Any:
        if self.tokenizer is None:
            raise InvalidRequestError(
                "structured output needs the model's tokenizer", RefusalReason.INVALID_PARAMS
            )
        xgr = _xgrammar()
        stops = [t for t in self.eos_token_ids if t < self.mask_vocab]
        info = xgr.TokenizerInfo.from_huggingface(
            self.tokenizer, vocab_size=self.mask_vocab, stop_token_ids=stops
        )
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=True)
        return self._compiler


def _with_affixes(structured: StructuredOutput) -> Any:
    """The grammar of ``prefix``, the constrained part, ``suffix`` in a row (uncompiled)."""
    grammar = _xgrammar().Grammar
    if structured.kind == "json":
        middle = grammar.from_json_schema(
            structured.spec or ANY_OBJECT,
            strict_mode=bool(structured.spec),
            any_whitespace=False,
        )
    elif structured.kind == "regex":
        middle = grammar.from_regex(structured.spec)
    else:
        middle = grammar.from_ebnf(structured.spec)
    parts = [middle]
    if structured.prefix:
        parts.insert(0, grammar.from_ebnf(f"root ::= {_literal(structured.prefix)}"))
    if structured.suffix:
        parts.append(grammar.from_ebnf(f"root ::= {_literal(structured.suffix)}"))
    return grammar.concat(*parts) if len(parts) > 1 else middle


def _literal(text: str) -> str:
    """``text`` as an EBNF string literal (JSON's escapes are the dialect's)."""
    return json.dumps(text, ensure_ascii=False)


def fill_threads() -> int:
    """Threads that fill a batch's bitmask: a quarter of this process's cores, 1 to 4.
    xgrammar's "auto" sizes its pool by the whole machine, which on a shared host (or
    next to the worker's host processes) is slower than one thread."""
    return max(1, min(4, len(os.sched_getaffinity(0)) // 4))


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise InvalidRequestError(
            "structured output needs xgrammar on the worker: pip install 'chatq[structured]'",
            RefusalReason.INVALID_PARAMS,
        ) from None
    return xgrammar


def bitmask_to_device(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The host bitmask on ``device``: from pinned memory on CUDA so the copy does not wait
    for the step running there."""
    if device.type == "cuda":
        pinned = mask if mask.is_pinned() else mask.pin_memory()
        return pinned.to(device, non_blocking=True)
    return mask.to(device)


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set the logits [N, vocab] of tokens whose bit is clear in ``mask`` [N, words] (on the
    logits' device) to -inf, in place; returns them. Logits past the mask's width (ids past
    the tokenizer's) are -inf on constrained rows (a row with a bit clear), left alone on
    the others."""
    vocab = logits.shape[-1]
    bits = _BITS.get(mask.device)
    if bits is None:
        bits = _BITS[mask.device] = torch.arange(32, dtype=torch.int32, device=mask.device)
    cols = min(vocab, mask.shape[1] * 32)
    allowed = ((mask[:, :, None] >> bits) & 1).bool().flatten(1)[:, :cols]
    logits[:, :cols].masked_fill_(~allowed, float("-inf"))
    if vocab > cols:
        constrained = (mask != -1).any(dim=1, keepdim=True)
        logits[:, cols:].masked_fill_(constrained, float("-inf"))
    return logits
