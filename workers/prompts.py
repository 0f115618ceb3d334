"""Chat template + tokenizer: messages → prompt token ids, a batch at a time.

Runs on intake's side of the worker, never in the engine's loop. The template is rendered
with the tokenizer's own compiled Jinja template (what ``apply_chat_template`` does inside,
minus its per-call overhead) when that gives byte-identical text on a probe conversation,
else with ``apply_chat_template``.

Tokenizing goes through :class:`SegmentEncoder`. A HF fast tokenizer first splits the text
at its added tokens that match on raw text (``<|im_start|>``, ``<|im_end|>``...) and then
normalizes, pre-tokenizes and encodes each piece between them on its own. So the ids of a
piece do not depend on the rest of the prompt, and a bounded LRU cache keyed by the piece's
text gives exactly the ids of tokenizing the whole string: a system prompt shared by many
chats (a customer-service bot) costs a dict lookup, and only new text reaches the Rust
tokenizer (one ``encode_batch`` per batch, which releases the GIL). The cache is used only
when that independence holds for the loaded tokenizer: no added token that strips or matches
whole words, no ``encode_special_tokens``, and piecewise ids equal to whole-string ids on
probe strings at start-up (e.g. a Metaspace pre-tokenizer that adds its prefix to the first
piece only fails that check); otherwise every text is tokenized whole.

User text is text (:class:`LiteralText`): a special-token string in a message's content
(``<|im_end|>`` in a user turn) must not become the control token, or a user could write a
fake system turn. Content is escaped before the template is rendered (each special-token
string becomes a private-use sequence the tokenizer never matches), so only the template
inserts control tokens; the pieces that hold escapes are unescaped and tokenized with a
copy of the tokenizer that reads special-token strings as plain text. Content without such
strings renders and tokenizes exactly as before.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from producer.contract.envelope import Envelope
from producer.contract.tools import template_tools
from workers.answer import AnswerSpec
from workers.errors import WorkerError
from workers.reasoning import has_think_tokens, opens_reasoning
from workers.tool_calls import (
    HERMES_END,
    HERMES_START,
    describe_tools,
    forced_call_grammar,
    template_tool_format,
)

log = logging.getLogger(__name__)


class PromptError(WorkerError):
    """A request this model's chat template cannot render as asked (its message says why)."""


CHATML_FALLBACK = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_PROBE = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Where is my order #12345?"},
    {"role": "assistant", "content": "It ships today."},
    {"role": "user", "content": "Thanks — and a refund? ✓"},
]
# A conversation with tools, a call and its answer: the rich render must give the same
# text as apply_chat_template on it to be used.
_TOOL_PROBE: list[dict[str, Any]] = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Where is order A1?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "lookup_order", "arguments": {"order_id": "A1"}},
            }
        ],
    },
    {"role": "tool", "content": '{"status": "shipped"}', "tool_call_id": "call_1"},
]
_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Look up an order.",
            "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
        },
    }
]
# Texts around added tokens that would expose a tokenizer whose pieces are not independent
# (prefix spaces, whitespace next to a token, a token first / last / twice in a row).
_PIECE_PROBES = (
    "hello world",
    " leading space",
    "{t}user\nWhere is my order #12345?{t}\n{t}assistant\n",
    "a {t} b{t}  c\n\n{t}{t}d \t{t}",
    "{t}x",
    "x{t}",
    "  {t}  ",
    "Grüße, ¿qué tal? 東京 🙂{t}ünïcödé{t} 12 345",
)
PROBE_TOKENS = 32  # added tokens (lowest ids: bos/eos/chat markers) the probes are built with
CACHE_MAX_PIECES = 16_384
CACHE_MAX_CHARS = 8_000_000  # text of all cached pieces together (bounds the cache's memory)
# Escapes in rendered text start with this (Unicode plane 15, private use): a sequence of it
# and one more private-use character stands for one special-token string of the content.
SENTINEL = "\U000f0000"
_ESCAPE_BASE = 0xF0100


class LiteralText:
    """Keeps special-token strings in message content literal: ``escape`` before the
    template renders, ``ids`` for rendered text that holds escapes (split where the
    tokenizer splits, at the raw added tokens the template wrote; each piece unescaped and
    tokenized with special-token strings read as text)."""

    def __init__(self, backend: Any) -> None:
        from tokenizers import Tokenizer

        added = backend.get_added_tokens_decoder()
        specials = sorted({t.content for t in added.values() if t.special})
        self.escape_of = {t: SENTINEL + chr(_ESCAPE_BASE + k) for k, t in enumerate(specials)}
        self.escape_of[SENTINEL] = SENTINEL + chr(_ESCAPE_BASE - 1)  # the sentinel itself
        self.text_of = {e: t for t, e in self.escape_of.items()}
        self._find = _alternation(self.escape_of)
        self._unescape = re.compile(re.escape(SENTINEL) + ".", re.DOTALL)
        raw = {t.content: int(i) for i, t in added.items() if not t.normalized}
        self._token_ids = raw
        self._split = re.compile("(" + _alternation(raw).pattern + ")") if raw else None
        self._literal = Tokenizer.from_str(backend.to_str())
        self._literal.encode_special_tokens = True

    def escape(self, content: str) -> str:
        if self._find.search(content) is None:
            return content
        return self._find.sub(lambda m: self.escape_of[m.group()], content)

    def unescape(self, text: str) -> str:
        return self._unescape.sub(lambda m: self.text_of.get(m.group(), m.group()), text)

    def ids(self, text: str) -> list[int]:
        """Token ids of rendered text with escapes (a whole text or one piece of it)."""
        pieces = self._split.split(text) if self._split is not None else [text]
        out: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                out.append(self._token_ids[piece])
            elif piece:
                out += self._literal.encode(self.unescape(piece), add_special_tokens=False).ids
        return out


def _alternation(strings: Any) -> re.Pattern[str]:
    """A regex matching any of ``strings``, longest first (the tokenizer's leftmost-longest)."""
    return re.compile("|".join(re.escape(t) for t in sorted(strings, key=len, reverse=True)))


class SegmentEncoder:
    """Token ids of texts, with the pieces between added tokens cached when that is exact."""

    def __init__(self, backend: Any, literal: LiteralText | None = None) -> None:
        self.backend = backend
        self.literal = literal
        # Same ids without the offsets nobody here reads (tokenizers >= 0.21).
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self.hits = 0
        self.misses = 0
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._cached_chars = 0
        self._split: re.Pattern[str] | None = None
        self._token_ids: dict[str, int] = {}
        reason = self._setup()
        if reason is not None:
            log.info("prompt piece cache off (%s): prompts are tokenized whole", reason)
            self._split = None

    @property
    def exact(self) -> bool:
        """True when pieces are cached (proven exact for this tokenizer at start-up)."""
        return self._split is not None

    def _setup(self) -> str | None:
        """Build the splitter; the reason it cannot be used, or None."""
        if getattr(self.backend, "encode_special_tokens", False):
            return "encode_special_tokens is set"
        try:
            added = self.backend.get_added_tokens_decoder()
        except AttributeError:
            return "the tokenizer does not list its added tokens"
        raw = {}
        for token_id, token in added.items():
            if token.normalized:
                continue  # matched after normalization, inside a piece: the piece handles it
            if token.lstrip or token.rstrip or token.single_word:
                return f"added token {token.content!r} strips spaces or matches whole words"
            raw[token.content] = int(token_id)
        if not raw:
            return "no added tokens match on raw text"
        self._token_ids = raw
        longest_first = sorted(raw, key=len, reverse=True)  # = the tokenizer's leftmost-longest
        self._split = re.compile("(" + "|".join(re.escape(t) for t in longest_first) + ")")
        by_id = sorted(raw, key=raw.__getitem__)[:PROBE_TOKENS]
        return self.verify([p.format(t=t) for p in _PIECE_PROBES for t in by_id])

    def verify(self, texts: list[str]) -> str | None:
        """Compare piecewise with whole-string ids on ``texts``; on a difference, turn the
        cache off and say why (None: all equal, or the cache is off already)."""
        if self._split is None:
            return None
        for text in texts:
            whole = list(self.backend.encode(text, add_special_tokens=False).ids)
            if self._encode_pieces([text], cache=False)[0] != whole:
                self._split = None
                return f"piecewise ids differ from whole-string ids on {text!r}"
        return None

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self._split is None:
            return self.encode_raw(texts)
        return self._encode_pieces(texts, cache=True)

    def encode_raw(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text tokenized whole, no cache: Rust only, the GIL released (thread-safe).
        A text holding escaped content (:class:`LiteralText`) goes its own way."""
        if not texts:
            return []
        literal = self.literal
        if literal is not None and any(SENTINEL in t for t in texts):
            plain = [t for t in texts if SENTINEL not in t]
            done = iter(self.encode_raw(plain))
            return [literal.ids(t) if SENTINEL in t else next(done) for t in texts]
        return [list(e.ids) for e in self._encode_batch(texts, add_special_tokens=False)]

    def plan(self, texts: list[str]) -> tuple[list[list[str]], list[str]]:
        """Split ``texts`` at added tokens: (pieces of each text, the pieces not cached).

        On the loop; only the missing pieces need the tokenizer (``encode_raw``), then
        ``join``. With the cache off each text is one whole piece and all are missing."""
        if self._split is None:
            return [[t] for t in texts], list(texts)
        split = self._split.split
        pieces_of = [split(text) for text in texts]
        found = self._cache
        # re.split with one group: text, token, text, token, ..., text (odd places: tokens)
        missing = list(
            {p: None for pieces in pieces_of for p in pieces[::2] if p and p not in found}
        )
        return pieces_of, missing

    def join(
        self, pieces_of: list[list[str]], missing: list[str], encoded: list[list[int]]
    ) -> list[list[int]]:
        """Token ids of each text from ``plan``'s pieces and the missing pieces' ids (on the
        loop: the cache changes only here)."""
        new = dict(zip(missing, encoded, strict=True))
        if self._split is None:
            return [new[pieces[0]] for pieces in pieces_of]
        return self._assemble(pieces_of, new, missing, cache=True)

    def _encode_pieces(self, texts: list[str], *, cache: bool) -> list[list[int]]:
        assert self._split is not None
        split = self._split.split
        found: dict[str, list[int]] = self._cache if cache else {}
        pieces_of = [split(text) for text in texts]
        missing = list(
            {p: None for pieces in pieces_of for p in pieces[::2] if p and p not in found}
        )
        new = dict(zip(missing, self.encode_raw(missing), strict=True))
        return self._assemble(pieces_of, new, missing, cache=cache)

    def _assemble(
        self,
        pieces_of: list[list[str]],
        new: dict[str, list[int]],
        missing: list[str],
        *,
        cache: bool,
    ) -> list[list[int]]:
        token_ids = self._token_ids
        found: dict[str, list[int]] = self._cache if cache else {}
        new_get, found_get = new.get, found.get
        touch = self._cache.move_to_end
        out: list[list[int]] = []
        hits = 0
        for pieces in pieces_of:
            ids: list[int] = []
            # re.split with one group: text, token, text, ..., token, text
            last = len(pieces) - 1
            for i in range(0, last + 1, 2):
                piece = pieces[i]
                if piece:
                    cached = new_get(piece)
                    if cached is None:
                        cached = found_get(piece)
                        if cached is None:  # evicted since ``plan`` (another batch ran)
                            cached = new[piece] = self.encode_raw([piece])[0]
                        else:
                            hits += 1
                            if cache:
                                touch(piece)
                    ids += cached
                if i < last:
                    ids.append(token_ids[pieces[i + 1]])
            out.append(ids)
        if cache:
            self.hits += hits
            self.misses += len(missing)
            self._remember(new)
        return out

    def _remember(self, new: dict[str, list[int]]) -> None:
        for piece, ids in new.items():
            self._cache[piece] = ids
            self._cached_chars += len(piece)
        while self._cache and (
            len(self._cache) > CACHE_MAX_PIECES or self._cached_chars > CACHE_MAX_CHARS
        ):
            piece, _ = self._cache.popitem(last=False)
            self._cached_chars -= len(piece)


class PromptBuilder:
    """Chat template and tokenization of envelopes' messages, with a cache of known pieces."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            log.warning("the tokenizer has no chat template; using ChatML")
            tokenizer.chat_template = CHATML_FALLBACK
        # transformers builds this dict on every access; the template only reads it.
        self._special_tokens = dict(tokenizer.special_tokens_map)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._literal = _literal_text(backend)
        self._segments = (
            SegmentEncoder(backend, self._literal) if hasattr(backend, "encode_batch") else None
        )
        self._template = self._compiled_template()
        self._context_base: dict[str, Any] | None = self._flat_context()
        source = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        self.tool_format, self._describe_tools = template_tool_format(source)
        self.think = has_think_tokens(tokenizer.get_vocab())
        self._rich_fast = self._rich_template_exact()
        if self._segments is not None:
            try:
                probe = [self.render_messages(_PROBE)]
            except Exception:  # a template that refuses the probe: the piece probes stand
                probe = []
            reason = self._segments.verify(probe)
            if reason is not None:
                log.info("prompt piece cache off (%s): prompts are tokenized whole", reason)

    @property
    def flat_render(self) -> bool:
        """True when templates render from one flat context dict (checked exact at start)."""
        return self._context_base is not None

    @property
    def segments(self) -> SegmentEncoder | None:
        return self._segments

    def _compiled_template(self) -> Any:
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            template = _compile_jinja_template(self.tokenizer.chat_template)
            fast = template.render(
                messages=_PROBE, add_generation_prompt=True, **self._special_tokens
            )
        except Exception:  # a private helper that moved, or a template needing more context
            return None
        slow = self.tokenizer.apply_chat_template(
            _PROBE, tokenize=False, add_generation_prompt=True
        )
        return template if fast == slow else None

    def _flat_context(self) -> dict[str, Any] | None:
        """Template globals + special tokens as one plain dict, so a render builds its context
        from a dict copy instead of Jinja's ``new_context`` merging a ChainMap of globals per
        call (a visible share of the host's CPU per request on the queue bench,
        docs/benchmarks.md). Used only when it renders
        the probe exactly like ``Template.render``."""
        template = self._template
        if template is None:
            return None
        try:
            base = {
                **dict(template.globals),
                **self._special_tokens,
                "add_generation_prompt": True,
            }
            self._context_base = base
            fast = self._render_flat(_PROBE)
        except Exception:  # a Jinja whose internals differ: the plain render stands
            return None
        slow = template.render(messages=_PROBE, add_generation_prompt=True, **self._special_tokens)
        return base if fast == slow else None

    def _render_flat(self, messages: list[dict[str, str]]) -> str:
        from jinja2.runtime import new_context

        template = self._template
        base = self._context_base
        assert template is not None and base is not None
        ctx = new_context(
            template.environment,
            template.name,
            template.blocks,
            {**base, "messages": messages},
            shared=True,
            globals=base,
        )
        text: str = template.environment.concat(template.root_render_func(ctx))
        return text

    def _rich_template_exact(self) -> bool:
        """True when the compiled template renders tools, calls and template names exactly
        like ``apply_chat_template`` (else requests with them use that)."""
        if self._template is None:
            return False
        try:
            fast = self._render_rich_fast(
                list(_TOOL_PROBE), _PROBE_TOOLS, {"enable_thinking": False}
            )
            slow = self.tokenizer.apply_chat_template(
                _TOOL_PROBE, tools=_PROBE_TOOLS, tokenize=False, add_generation_prompt=True,
                enable_thinking=False,
            )  # fmt: skip
        except Exception:  # a template that refuses the probe: apply_chat_template decides
            return False
        return bool(fast == slow)

    def render(self, env: Envelope) -> str:
        """The prompt text, each message's content escaped (special-token strings stay text)."""
        escape = self._literal.escape if self._literal is not None else str
        if env.plain:
            return self.render_messages(
                [{"role": m.role, "content": escape(m.content)} for m in env.messages]
            )
        return self.render_rich(env)

    def uses_tools(self, env: Envelope) -> bool:
        """The request offers tools the model may call; :class:`PromptError` if this model
        cannot parse its calls."""
        if not env.tools or env.tool_choice == "none":
            return False
        if self.tool_format is None:
            raise PromptError(
                "this model's chat template writes tool calls in a format chatq does not "
                "parse (supported: <tool_call> JSON, Llama 3 JSON)"
            )
        return True

    def forced_grammar(self, env: Envelope) -> str | None:
        """The grammar of a forced call (``tool_choice`` ``required`` or a name), else None;
        :class:`PromptError` where it cannot be enforced."""
        if env.tool_choice in ("auto", "none") or not self.uses_tools(env):
            return None
        assert self.tool_format is not None
        if env.params.structured is not None:
            raise PromptError("tool_choice forcing a call cannot be combined with response_format")
        try:
            return forced_call_grammar(self.tool_format, env.tools, env.tool_choice)
        except ImportError:
            raise PromptError(
                "tool_choice forcing a call needs constrained decoding: install xgrammar on "
                "the worker (pip install 'chatq[structured]'), or use 'auto'"
            ) from None
        except ValueError as err:
            raise PromptError(str(err)) from None

    def render_rich(self, env: Envelope) -> str:
        """The prompt of a request with tools, tool messages or template names; every string
        of the messages and tools escaped (special-token strings stay text)."""
        messages = [self._escaped(m.to_template()) for m in env.messages]
        tools = self._escaped(template_tools(env.tools)) if self.uses_tools(env) else None
        if self._describe_tools:  # the template ignores tools: chatq writes them as text
            messages = _tools_as_text(messages, tools)
            tools = None
        kwargs = dict(env.chat_template_kwargs or {})
        if self._rich_fast:
            return self._render_rich_fast(messages, tools, kwargs)
        rendered: str = self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
        )
        return rendered

    def _escaped(self, value: Any) -> Any:
        """``value`` (JSON-like: dicts, lists, strings) with every string escaped."""
        literal = self._literal
        if literal is None:
            return value
        if isinstance(value, str):
            return literal.escape(value)
        if isinstance(value, dict):
            return {k: self._escaped(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._escaped(v) for v in value]
        return value

    def _render_rich_fast(
        self, messages: list[dict[str, Any]], tools: Any, kwargs: dict[str, Any]
    ) -> str:
        assert self._template is not None
        text: str = self._template.render(
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=True,
            **{**self._special_tokens, **kwargs},
        )
        return text

    def answer_spec(self, env: Envelope, prompt: str) -> AnswerSpec | None:
        """How to split this request's answer (None: its text is the whole answer)."""
        tools = self.uses_tools(env)
        if not (tools or self.think):
            return None
        return AnswerSpec(
            reasoning=self.think,
            in_reasoning=self.think and opens_reasoning(prompt),
            tool_format=self.tool_format if tools else None,
            tool_names=frozenset(t.name for t in env.tools) if tools else frozenset(),
            grammar=self.forced_grammar(env),
        )

    def render_messages(self, messages: list[dict[str, str]]) -> str:
        if self._context_base is not None:
            return self._render_flat(messages)
        if self._template is not None:
            text: str = self._template.render(
                messages=messages, add_generation_prompt=True, **self._special_tokens
            )
            return text
        rendered: str = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return rendered

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self._segments is not None:
            return self._segments.encode(texts)
        return [list(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]

    @property
    def literal(self) -> LiteralText | None:
        return self._literal

    def batch(self, envs: Sequence[Envelope]) -> list[list[int] | Exception]:
        """Token ids per envelope, or the exception its template raised (role order...)."""
        prepared = self.prepare(envs)
        prepared.encode()
        return prepared.token_ids()

    def prepare(self, envs: Sequence[Envelope]) -> PreparedPrompts:
        """Render the chat templates and split the texts (Python: on the loop); what is left
        is ``PreparedPrompts.encode``, the Rust tokenizer alone (may run in a thread)."""
        texts: list[str | Exception] = []
        specs: list[AnswerSpec | None] = []
        for env in envs:
            try:
                text = self.render(env)
                specs.append(self.answer_spec(env, text))
                texts.append(text)
            except Exception as err:
                texts.append(err)
                specs.append(None)
        return PreparedPrompts(self, texts, specs)


def _literal_text(backend: Any) -> LiteralText | None:
    """The tokenizer's :class:`LiteralText`; None for one that does not list its added
    tokens (a slow tokenizer: its special tokens in content are not kept literal)."""
    try:
        return LiteralText(backend)
    except Exception as err:  # no backend, or one without added tokens / serialization
        log.warning("special-token strings in content cannot be kept literal: %s", err)
        return None


class PreparedPrompts:
    """A batch between ``PromptBuilder.prepare`` and ``token_ids``: ``encode`` runs only the
    Rust tokenizer on text the piece cache does not know (``todo_chars`` of it), so it can
    go to a thread without holding the GIL; the rest happens on the loop."""

    def __init__(
        self,
        builder: PromptBuilder,
        texts: list[str | Exception],
        specs: list[AnswerSpec | None] | None = None,
    ) -> None:
        self._builder = builder
        self._texts = texts
        self.specs: list[AnswerSpec | None] = list(specs) if specs is not None else []
        if specs is None:
            self.specs = [None] * len(texts)
        ok = [t for t in texts if isinstance(t, str)]
        segments = builder.segments
        self._pieces_of: list[list[str]] = []
        if segments is not None:
            self._pieces_of, self.todo = segments.plan(ok)
        else:
            self.todo = ok
        self.todo_chars = sum(len(t) for t in self.todo)
        self._encoded: list[list[int]] | None = None

    def encode(self) -> None:
        segments = self._builder.segments
        if segments is not None:
            self._encoded = segments.encode_raw(self.todo)
        else:
            self._encoded = self._builder.encode(self.todo)

    def token_ids(self) -> list[list[int] | Exception]:
        assert self._encoded is not None, "encode() first"
        segments = self._builder.segments
        if segments is not None:
            ids = iter(segments.join(self._pieces_of, self.todo, self._encoded))
        else:
            ids = iter(self._encoded)
        return [t if isinstance(t, Exception) else next(ids) for t in self._texts]


def _tools_as_text(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Messages for a template that ignores tools: the tools described in the system
    message, each call written in the answer's format, each tool answer as its text."""
    out: list[dict[str, Any]] = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            written = [
                HERMES_START
                + "\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                    ensure_ascii=False,
                )
                + "\n"
                + HERMES_END
                for c in calls
            ]
            content = "\n".join(([m["content"]] if m["content"] else []) + written)
            m = {"role": m["role"], "content": content}
        elif m["role"] == "tool":
            m = {"role": "tool", "content": m["content"]}
        out.append(m)
    if tools:
        text = describe_tools(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out
