"""Tool calls in a model's answer: which format a model writes them in, and the parsers that
turn its text into :class:`~producer.contract.tools.ToolCall` objects as it streams.

Two formats cover the supported families:

- ``hermes`` (Qwen2.5, Qwen3, and models whose template ignores tools, where chatq describes
  the tools itself): each call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
  text around the calls is answer text.
- ``llama3_json`` (Llama 3.1-3.3): the answer *is* the call, a JSON object ``{"name": ...,
  "parameters": {...}}`` (several separated by ``;``), after a ``<|python_tag|>`` that
  decoding drops.

A call is accepted only when it parses, names one of the request's tools and its arguments
are an object; anything else stays answer text, so nothing the model wrote is lost.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from collections import OrderedDict
from typing import Any, Protocol

from producer.contract.tools import ToolCall, ToolChoice, ToolSpec

HERMES_START = "<tool_call>"
HERMES_END = "</tool_call>"


class ToolFormat(str, enum.Enum):
    """How a model writes tool calls (chosen from its chat template)."""

    HERMES = "hermes"
    LLAMA3_JSON = "llama3_json"


def template_tool_format(template: str) -> tuple[ToolFormat | None, bool]:
    """(the format, whether chatq must describe the tools itself) for a chat template;
    (None, False): the template renders tools in a format chatq does not parse."""
    if HERMES_START in template:
        return ToolFormat.HERMES, False
    if "<|python_tag|>" in template or ('"parameters"' in template and "ipython" in template):
        return ToolFormat.LLAMA3_JSON, False
    if "tools" not in template:
        return ToolFormat.HERMES, True
    return None, False


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _call(obj: object, names: frozenset[str], args_key: str) -> ToolCall | None:
    """A call from a parsed object, if it is one of the tools with object arguments."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    arguments = obj.get(args_key, obj.get("arguments"))
    if not isinstance(name, str) or name not in names or not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), name, json.dumps(arguments, ensure_ascii=False))


class ToolCallParser(Protocol):
    """Splits streamed answer text into (content delta, calls completed)."""

    def feed(self, text: str) -> tuple[str, list[ToolCall]]: ...

    def finish(self) -> tuple[str, list[ToolCall]]: ...


def _partial_tag(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class HermesParser:
    """``<tool_call>`` JSON ``</tool_call>`` blocks among answer text."""

    def __init__(self, tool_names: frozenset[str]) -> None:
        self.names = tool_names
        self._inside = False
        self._buffer = ""  # text of an open call, or the held-back end of the content

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        text = self._buffer + text
        self._buffer = ""
        content, calls = "", list[ToolCall]()
        while text:
            if not self._inside:
                start = text.find(HERMES_START)
                if start < 0:
                    keep = _partial_tag(text, HERMES_START)
                    content += text[: len(text) - keep]
                    self._buffer = text[len(text) - keep :]
                    break
                content += text[:start]
                self._inside = True
                text = text[start + len(HERMES_START) :]
            end = text.find(HERMES_END)
            if end < 0:
                self._buffer = text
                break
            content += self._close(text[:end], calls, closed=True)
            text = text[end + len(HERMES_END) :]
        return content, calls

    def _close(self, body: str, calls: list[ToolCall], *, closed: bool) -> str:
        """End an open call: the text that stays content ("" when it is a call)."""
        self._inside = False
        try:
            call = _call(json.loads(body), self.names, "arguments")
        except ValueError:
            call = None
        if call is not None:
            calls.append(call)
            return ""
        return HERMES_START + body + (HERMES_END if closed else "")

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the answer: a call left open (the model stopped before its closing
        tag) still counts when its JSON is whole."""
        rest, self._buffer = self._buffer, ""
        calls: list[ToolCall] = []
        if self._inside:
            return self._close(rest, calls, closed=False), calls
        return rest, calls


class Llama3JsonParser:
    """An answer that is one or more JSON calls (``;``-separated), or plain text."""

    def __init__(self, tool_names: frozenset[str]) -> None:
        self.names = tool_names
        self._mode = "start"  # start → json (held to the end) | text (streamed)
        self._held = ""

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if self._mode == "text":
            return text, []
        self._held += text
        if self._mode == "start":
            stripped = self._held.lstrip()
            if not stripped:
                return "", []
            self._mode = "json" if stripped.startswith("{") else "text"
            if self._mode == "text":
                held, self._held = self._held, ""
                return held, []
        return "", []

    def finish(self) -> tuple[str, list[ToolCall]]:
        held, self._held = self._held, ""
        if self._mode != "json":
            return held, []
        calls = self._parse(held)
        return ("", calls) if calls else (held, [])

    def _parse(self, text: str) -> list[ToolCall]:
        decoder = json.JSONDecoder()
        calls: list[ToolCall] = []
        at = 0
        while True:
            while at < len(text) and (text[at].isspace() or text[at] == ";"):
                at += 1
            if at == len(text):
                return calls
            try:
                obj, at = decoder.raw_decode(text, at)
            except ValueError:
                return []
            call = _call(obj, self.names, "parameters")
            if call is None:
                return []
            calls.append(call)


def make_parser(fmt: ToolFormat, tool_names: frozenset[str]) -> ToolCallParser:
    if fmt is ToolFormat.HERMES:
        return HermesParser(tool_names)
    return Llama3JsonParser(tool_names)


def describe_tools(tools: list[dict[str, Any]]) -> str:
    """The system text chatq adds for a model whose template ignores tools: the tools and
    the hermes format to call them in."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You may call functions to answer. To call one, reply with exactly\n"
        f'{HERMES_START}\n{{"name": "<function name>", "arguments": {{<arguments>}}}}\n'
        f"{HERMES_END}\nThe functions, as JSON:\n{listing}"
    )


GRAMMAR_CACHE_MAX = 256
_grammars: OrderedDict[str, str] = OrderedDict()


def forced_call_grammar(fmt: ToolFormat, tools: tuple[ToolSpec, ...], choice: ToolChoice) -> str:
    """An EBNF grammar (xgrammar's dialect, root rule ``root``) whose every sentence is
    exactly one call in ``fmt`` to one of ``tools`` (``required``) or to the named tool,
    with arguments that follow its ``parameters`` schema (no properties beyond it).
    Constrained decoding with it makes a forced tool call valid whatever the model.
    Raises ``ImportError`` without xgrammar, ``ValueError`` for a schema it cannot take."""
    chosen = [t for t in tools if isinstance(choice, str) or t.name == choice["name"]]
    key = "arguments" if fmt is ToolFormat.HERMES else "parameters"
    cases = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.name},
                key: _arguments_schema(t),
            },
            "required": ["name", key],
        }
        for t in chosen
    ]
    # Property order matters (xgrammar writes "name" first, as the parsers read it).
    schema = json.dumps(cases[0] if len(cases) == 1 else {"anyOf": cases})
    cache_key = f"{fmt.value}\0{schema}"
    grammar = _grammars.get(cache_key)
    if grammar is None:
        grammar = _grammar_of(fmt, schema)
        _grammars[cache_key] = grammar
        while len(_grammars) > GRAMMAR_CACHE_MAX:
            _grammars.popitem(last=False)
    return grammar


def _arguments_schema(tool: ToolSpec) -> dict[str, Any]:
    """The schema a forced call's arguments follow: the tool's own, or (a tool without
    named properties) exactly ``{}``, where a free object would let a model ramble."""
    params = dict(tool.parameters or {})
    if "properties" not in params and "anyOf" not in params and "oneOf" not in params:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    return params


def _grammar_of(fmt: ToolFormat, schema: str) -> str:
    import xgrammar

    try:
        # Compact JSON (free whitespace lets a small model pad forever) and strict objects.
        call = str(
            xgrammar.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)
        )
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"the tools' parameters are no JSON Schema xgrammar takes: {err}"
        ) from None
    call = re.sub(r"^root ::=", "tool_json ::=", call, flags=re.M)
    if fmt is ToolFormat.HERMES:
        return f'root ::= "{HERMES_START}\\n" tool_json "\\n{HERMES_END}"\n{call}'
    return f"root ::= tool_json\n{call}"
