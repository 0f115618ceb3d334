"""Tools in a request: the functions a model may call, how it must choose, and the calls an
assistant message carries; each with its wire form and its checks.

On the wire (``docs/protocol.md``) a tool is ``{name, description?, parameters?}`` (the
function of an OpenAI ``{"type": "function", "function": ...}`` tool), a call is ``{id,
name, arguments}`` with ``arguments`` a JSON text, and ``tool_choice`` is ``"auto"``,
``"none"``, ``"required"`` or ``{"name": NAME}``. The chat template sees them in OpenAI's
shape (:func:`template_tools`, :func:`template_tool_calls`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from producer.contract.codes import ErrorCode
from producer.errors import ProtocolError

TOOL_NAME_PATTERN = re.compile(r"[A-Za-z0-9_\-.]{1,64}")
CALL_ID_PATTERN = re.compile(r"[A-Za-z0-9_\-.:]{1,64}")
TOOL_CHOICE_MODES = ("auto", "none", "required")
MAX_TOOLS = 64
MAX_TOOL_CALLS = 32
MAX_DESCRIPTION_CHARS = 4_096
MAX_ARGUMENTS_CHARS = 65_536
MAX_TEMPLATE_KWARGS = 16
TEMPLATE_KWARG_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# Names the template context has already (a kwarg may not replace them).
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages", "tools", "add_generation_prompt", "documents", "bos_token", "eos_token"}
)


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call: ``parameters`` is its arguments' JSON Schema."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"name": self.name}
        if self.description:
            wire["description"] = self.description
        if self.parameters is not None:
            wire["parameters"] = dict(self.parameters)
        return wire


@dataclass(frozen=True)
class ToolCall:
    """One call a model made: ``arguments`` is the JSON text of its arguments object."""

    id: str
    name: str
    arguments: str

    def to_wire(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


ToolChoice = str | Mapping[str, str]  # a mode, or {"name": NAME}: that function


def _bad(field_name: str, message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_REQUEST.value, message, field=field_name)


def _name(value: object, where: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _bad(where, f"must be a string matching {pattern.pattern}")
    return value


_TOOL_KEYS = frozenset({"name", "description", "parameters"})


def check_tools(raw: object) -> tuple[ToolSpec, ...]:
    """The tools of a wire map's ``tools`` (absent: none)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise _bad("tools", f"must be a list of at most {MAX_TOOLS} tools")
    tools: list[ToolSpec] = []
    seen: set[str] = set()
    for i, t in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or "name" not in t or not _TOOL_KEYS.issuperset(t):
            raise _bad(where, "must be a map of 'name' and optional 'description', 'parameters'")
        name = _name(t["name"], f"{where}.name", TOOL_NAME_PATTERN)
        if name in seen:
            raise _bad(f"{where}.name", f"names tool {name!r} twice")
        seen.add(name)
        description = t.get("description", "")
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
            raise _bad(
                f"{where}.description", f"must be a string of at most {MAX_DESCRIPTION_CHARS}"
            )
        parameters = t.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _bad(f"{where}.parameters", "must be a map (a JSON Schema)")
        tools.append(ToolSpec(name, description, parameters))
    return tuple(tools)


def check_tool_choice(raw: object, tools: tuple[ToolSpec, ...]) -> ToolChoice:
    """``tool_choice`` (absent: ``auto``); a named function must be one of ``tools``."""
    if raw is None:
        return "auto"
    if isinstance(raw, str):
        if raw not in TOOL_CHOICE_MODES:
            raise _bad("tool_choice", f"must be one of {list(TOOL_CHOICE_MODES)} or {{'name'}}")
        if raw == "required" and not tools:
            raise _bad("tool_choice", "is 'required' but no tools are given")
        return raw
    if not isinstance(raw, dict) or set(raw) != {"name"}:
        raise _bad("tool_choice", f"must be one of {list(TOOL_CHOICE_MODES)} or {{'name'}}")
    name = _name(raw["name"], "tool_choice.name", TOOL_NAME_PATTERN)
    if name not in {t.name for t in tools}:
        raise _bad("tool_choice.name", f"names {name!r}, which is not one of the tools")
    return {"name": name}


def check_tool_calls(raw: object, where: str) -> tuple[ToolCall, ...]:
    """An assistant message's ``tool_calls``."""
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_TOOL_CALLS:
        raise _bad(where, f"must be a list of 1 to {MAX_TOOL_CALLS} calls")
    calls: list[ToolCall] = []
    for i, c in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(c, dict) or set(c) != {"id", "name", "arguments"}:
            raise _bad(at, "must be a map of exactly 'id', 'name' and 'arguments'")
        arguments = c["arguments"]
        if not isinstance(arguments, str) or len(arguments) > MAX_ARGUMENTS_CHARS:
            raise _bad(f"{at}.arguments", f"must be a JSON text of at most {MAX_ARGUMENTS_CHARS}")
        calls.append(
            ToolCall(
                _name(c["id"], f"{at}.id", CALL_ID_PATTERN),
                _name(c["name"], f"{at}.name", TOOL_NAME_PATTERN),
                arguments,
            )
        )
    return tuple(calls)


def check_call_id(raw: object, where: str) -> str:
    return _name(raw, where, CALL_ID_PATTERN)


def check_template_kwargs(raw: object) -> Mapping[str, Any] | None:
    """``chat_template_kwargs``: names the template reads (``enable_thinking``...) to scalars."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or len(raw) > MAX_TEMPLATE_KWARGS:
        raise _bad("chat_template_kwargs", f"must be a map of at most {MAX_TEMPLATE_KWARGS}")
    for key, value in raw.items():
        if not isinstance(key, str) or not TEMPLATE_KWARG_PATTERN.fullmatch(key):
            raise _bad(
                "chat_template_kwargs", f"has a name outside {TEMPLATE_KWARG_PATTERN.pattern}"
            )
        if key in RESERVED_TEMPLATE_KWARGS:
            raise _bad(f"chat_template_kwargs.{key}", "is set by chatq itself")
        scalar = value is None or isinstance(value, bool | int | str)
        if not scalar and not (isinstance(value, float) and value == value):
            raise _bad(f"chat_template_kwargs.{key}", "must be a boolean, number, string or null")
    return dict(raw)


def tool_choice_wire(choice: ToolChoice) -> str | dict[str, str]:
    return choice if isinstance(choice, str) else {"name": choice["name"]}


def template_tools(tools: tuple[ToolSpec, ...]) -> list[dict[str, Any]]:
    """The tools as chat templates read them (OpenAI's shape)."""
    out = []
    for t in tools:
        function: dict[str, Any] = {"name": t.name}
        if t.description:
            function["description"] = t.description
        if t.parameters is not None:
            function["parameters"] = dict(t.parameters)
        out.append({"type": "function", "function": function})
    return out


def template_tool_calls(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    """An assistant message's calls as chat templates read them: OpenAI's shape with the
    arguments as an object where they parse as one (templates write them with ``tojson``,
    which would quote a JSON text a second time)."""
    out = []
    for c in calls:
        try:
            arguments: Any = json.loads(c.arguments)
        except ValueError:
            arguments = c.arguments
        if not isinstance(arguments, dict):
            arguments = c.arguments
        function = {"name": c.name, "arguments": arguments}
        out.append({"id": c.id, "type": "function", "function": function})
    return out


def tools_from_api(raw: object) -> tuple[ToolSpec, ...]:
    """Tools as a caller gives them: :class:`ToolSpec` objects, wire maps, or OpenAI's
    ``{"type": "function", "function": {...}}``; checked as the wire checks them."""
    if isinstance(raw, tuple) and all(isinstance(t, ToolSpec) for t in raw):
        return raw
    if not isinstance(raw, list | tuple):
        raise _bad("tools", "must be a list of tools")
    wire = [
        t.to_wire() if isinstance(t, ToolSpec) else _unwrap(t, f"tools[{i}]", "function")
        for i, t in enumerate(raw)
    ]
    return check_tools(wire)


def tool_choice_from_api(raw: object, tools: tuple[ToolSpec, ...]) -> ToolChoice:
    """``tool_choice`` as a mode, ``{"name": ...}`` or OpenAI's named-function form."""
    if isinstance(raw, dict) and raw.get("type") == "function":
        raw = _unwrap(raw, "tool_choice", "function")
    return check_tool_choice(raw, tools)


def tool_calls_from_api(raw: object, where: str) -> tuple[ToolCall, ...]:
    """An assistant message's calls as :class:`ToolCall` objects, wire maps or OpenAI's
    ``{"id", "type": "function", "function": {"name", "arguments"}}``."""
    if not isinstance(raw, list | tuple):
        raise _bad(where, "must be a list of tool calls")
    wire = []
    for i, c in enumerate(raw):
        if isinstance(c, ToolCall):
            wire.append(c.to_wire())
            continue
        inner = _unwrap(c, f"{where}[{i}]", "function")
        wire.append({"id": c.get("id"), **inner} if inner is not c else c)
    return check_tool_calls(wire, where)


def _unwrap(value: object, where: str, kind: str) -> Any:
    """``value["function"]`` of an OpenAI ``{"type": "function", "function": {...}}``
    (other keys of ``value``: ``id``), else ``value`` itself."""
    if not isinstance(value, dict) or "type" not in value:
        return value
    if value.get("type") != kind or not isinstance(value.get(kind), dict):
        raise _bad(f"{where}.type", f"must be {kind!r} with a {kind!r} object")
    return value[kind]
