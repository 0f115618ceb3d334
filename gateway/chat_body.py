"""An OpenAI Chat Completions body → the client's submit options, in this one place.

Every field of the body is either mapped onto a :meth:`producer.ChatClient.submit` option,
accepted at the one value that asks for what chatq does anyway
(``parallel_tool_calls: true``...), or refused with a 400 that names it: nothing is ignored.
``logprobs: true`` with ``top_logprobs`` (0 to 20) becomes the submit option ``logprobs``
(the number of alternatives per token); ``n`` (1 to 16) the option ``n``.
``response_format`` (``json_object``, ``json_schema``) becomes grammar-constrained decoding
(the submit option ``structured``). chatq's own options come as extra body fields
(``priority``, ``deadline_s``, ``top_k``, ``ignore_eos``, ``repetition_penalty``,
``min_p``, ``stop_token_ids``, as vLLM takes them; the job API adds ``callback_url``) and
the ``Idempotency-Key`` header. Value bounds are the envelope's (one validation for every
producer); its field paths are mapped back to the body's names by :data:`PARAM_NAMES`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import Code, GatewayError
from gpu_engine.sequence import MAX_N, MAX_TOP_LOGPROBS

# Roles chatq's chat templates know; OpenAI's "developer" is its newer name for "system".
_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
# Fields accepted only at the value that means "what chatq does" (None/absent too).
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "functions": lambda v: v == [],
    # Calls come as the model writes them, several when it writes several.
    "parallel_tool_calls": lambda v: v is True,
}
_NEUTRAL_HINT = {
    "functions": "function calls are not supported (use tools)",
    "parallel_tool_calls": "only true is supported (the model may make several calls)",
}
_SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
    "stop_token_ids",
)
_CHATQ = ("priority", "deadline_s")
_KNOWN = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "user",
        "stream",
        "stream_options",
        "logit_bias",
        "response_format",
        "tools",
        "tool_choice",
        "chat_template_kwargs",
        "logprobs",
        "top_logprobs",
        "n",
        *_SAMPLING,
        *_CHATQ,
        *_NEUTRAL,
    }
)

PARAM_NAMES: dict[str, str] = {
    "params.max_tokens": "max_tokens",
    "params.temperature": "temperature",
    "params.top_p": "top_p",
    "params.top_k": "top_k",
    "params.seed": "seed",
    "params.stop": "stop",
    "params.ignore_eos": "ignore_eos",
    "params.presence_penalty": "presence_penalty",
    "params.frequency_penalty": "frequency_penalty",
    "params.repetition_penalty": "repetition_penalty",
    "params.min_p": "min_p",
    "params.stop_token_ids": "stop_token_ids",
    "params.logit_bias": "logit_bias",
    "params.logprobs": "top_logprobs",
    "params.n": "n",
    "params.structured": "response_format",
    "params.structured.kind": "response_format.type",
    "params.structured.spec": "response_format.json_schema.schema",
    "deadline_ms": "deadline_s",
    "idempotency_key": "Idempotency-Key",
}
"""Envelope field paths (as :class:`producer.ProtocolError` names them) → body names."""


@dataclass(frozen=True)
class ChatRequest:
    """One parsed body: the messages and :meth:`ChatClient.submit` options, plus how the
    answer is to be sent."""

    messages: list[dict[str, Any]]
    options: dict[str, Any]  # submit() keywords: model, max_tokens, temperature, ...
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    param_names: dict[str, str] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return str(self.options["model"])

    @property
    def n(self) -> int:
        """How many answers (choices) to generate."""
        n = self.options.get("n", 1)
        return n if isinstance(n, int) else 1

    @property
    def logprobs(self) -> bool:
        """The answer carries each token's log probabilities (``logprobs: true``)."""
        return "logprobs" in self.options


def _bad(param: str, message: str, code: Code = Code.INVALID_REQUEST) -> GatewayError:
    return GatewayError(code, message, param=param)


def parse_chat_body(
    body: object,
    *,
    default_max_tokens: int,
    extra_fields: Mapping[str, Callable[[Any], Any]] | None = None,
) -> ChatRequest:
    """Map a decoded JSON body onto submit options; 400 naming the first bad field.
    ``extra_fields`` are further accepted fields (the job API's ``callback_url``) with a
    function checking each value, which becomes a submit option of the same name."""
    if not isinstance(body, dict):
        raise GatewayError(Code.INVALID_REQUEST, "the body must be a JSON object")
    extra = extra_fields or {}
    for name, value in body.items():
        if name not in _KNOWN and name not in extra:
            raise _bad(name, "is not supported by chatq", Code.UNSUPPORTED_FIELD)
        if name in _NEUTRAL and value is not None and not _NEUTRAL[name](value):
            raise _bad(name, _NEUTRAL_HINT[name], Code.UNSUPPORTED_FIELD)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "is required (a served model name)")
    options: dict[str, Any] = {"model": model}
    names = dict(PARAM_NAMES)
    options["max_tokens"] = _max_tokens(body, default_max_tokens, names)
    for name in (*_SAMPLING, *_CHATQ):
        value = body.get(name)
        if value is not None:
            options[name] = value
    stop = body.get("stop")
    if stop is not None:
        if not isinstance(stop, str | list):
            raise _bad("stop", "must be a string or a list of strings")
        options["stop"] = stop
    if body.get("logit_bias") is not None:
        options["logit_bias"] = _logit_bias(body["logit_bias"])
    _answer_options(body, options)
    structured = _response_format(body.get("response_format"))
    if structured is not None:
        options["structured"] = structured
    for name, check in extra.items():
        if body.get(name) is not None:
            options[name] = check(body[name])
    _tool_options(body, options, names)
    stream, include_usage = _stream(body)
    messages = _messages(body.get("messages"))
    _call_names(messages, names)
    return ChatRequest(
        messages=messages,
        options=options,
        stream=stream,
        include_usage=include_usage,
        user=_user(body.get("user")),
        param_names=names,
    )


def _tool_options(body: Mapping[str, Any], options: dict[str, Any], names: dict[str, str]) -> None:
    """``tools``, ``tool_choice`` and ``chat_template_kwargs`` as submit options (checked by
    the contract; its field paths mapped to the body's)."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools", "must be an array of tools")
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict) and function.get("strict"):
                raise _bad(
                    f"tools[{i}].function.strict",
                    "is not supported: tool_choice 'required' or a named function makes the "
                    "call follow the tool's schema (constrained decoding)",
                    Code.UNSUPPORTED_FIELD,
                )
            if isinstance(function, dict) and "strict" in function:
                function = {k: v for k, v in function.items() if k != "strict"}
                tools[i] = {**tool, "function": function}
            for part in ("name", "description", "parameters"):
                names[f"tools[{i}].{part}"] = f"tools[{i}].function.{part}"
        options["tools"] = tools
    if body.get("tool_choice") is not None:
        options["tool_choice"] = body["tool_choice"]
        names["tool_choice.name"] = "tool_choice.function.name"
    if body.get("chat_template_kwargs") is not None:
        options["chat_template_kwargs"] = body["chat_template_kwargs"]


def _call_names(messages: list[dict[str, Any]], names: dict[str, str]) -> None:
    """Body names of the contract's paths into assistant messages' tool calls."""
    for i, m in enumerate(messages):
        for j, _ in enumerate(m.get("tool_calls") or ()):
            at = f"messages[{i}].tool_calls[{j}]"
            names[f"{at}.name"] = f"{at}.function.name"
            names[f"{at}.arguments"] = f"{at}.function.arguments"


def _max_tokens(body: Mapping[str, Any], default: int, names: dict[str, str]) -> Any:
    old, new = body.get("max_tokens"), body.get("max_completion_tokens")
    if old is not None and new is not None and old != new:
        raise _bad("max_completion_tokens", "differs from max_tokens; give one of them")
    if new is not None:
        names["params.max_tokens"] = "max_completion_tokens"
        return new
    return old if old is not None else default


def _logit_bias(value: object) -> dict[str, float]:
    """OpenAI's logit_bias: token ids (as JSON object keys, strings) -> bias in [-100, 100]
    (the envelope checks the bounds)."""
    if not isinstance(value, dict):
        raise _bad("logit_bias", "must be an object mapping token ids to numbers")
    for key in value:
        if not key.isdigit():
            raise _bad("logit_bias", f"keys must be token ids, got {key!r}")
    return dict(value)


def _answer_options(body: Mapping[str, Any], options: dict[str, Any]) -> None:
    """``logprobs`` / ``top_logprobs`` and ``n`` as the submit options ``logprobs`` and
    ``n`` (left out at their defaults)."""
    top_logprobs = _logprobs(body.get("logprobs"), body.get("top_logprobs"))
    if top_logprobs is not None:
        options["logprobs"] = top_logprobs
    n = body.get("n")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise _bad("n", f"must be an integer in [1, {MAX_N}]")
        if n != 1:
            options["n"] = n


def _logprobs(logprobs: object, top_logprobs: object) -> int | None:
    """``logprobs`` / ``top_logprobs`` as the submit option ``logprobs`` (alternatives per
    token; None: no log probabilities). ``top_logprobs`` needs ``logprobs: true``, as
    OpenAI's API has it."""
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _bad("logprobs", "must be a boolean")
    if top_logprobs is not None:
        if (
            isinstance(top_logprobs, bool)
            or not isinstance(top_logprobs, int)
            or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS
        ):
            raise _bad("top_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if logprobs is not True:
            raise _bad("top_logprobs", "requires logprobs: true")
    if not logprobs:
        return None
    return top_logprobs if isinstance(top_logprobs, int) else 0


def _response_format(value: object) -> dict[str, str] | None:
    """``response_format`` as the ``structured`` submit option: ``json_object`` is any JSON
    object, ``json_schema`` its ``schema`` (constrained whether ``strict`` is true or not:
    decoding cannot leave the schema either way); ``text`` or absent: None."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise _bad("response_format", "must be an object with a type")
    kind = value["type"]
    if kind == "text" and set(value) == {"type"}:
        return None
    if kind == "json_object" and set(value) == {"type"}:
        return {"kind": "json", "spec": ""}
    if kind != "json_schema":
        raise _bad(
            "response_format.type",
            'must be "text", "json_object" or "json_schema"',
            Code.UNSUPPORTED_FIELD,
        )
    spec = value.get("json_schema")
    if set(value) != {"type", "json_schema"} or not isinstance(spec, dict):
        raise _bad("response_format.json_schema", "is required with type json_schema")
    for name in spec:
        if name not in ("name", "description", "schema", "strict"):
            raise _bad(f"response_format.json_schema.{name}", "is not supported")
    if not isinstance(spec.get("name"), str):
        raise _bad("response_format.json_schema.name", "is required (a string)")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise _bad("response_format.json_schema.schema", "must be a JSON schema object")
    return {"kind": "json", "spec": json.dumps(schema) if schema else ""}


def _stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise _bad("stream_options", "is only allowed when stream is true")
    if not isinstance(opts, dict):
        raise _bad("stream_options", "must be an object")
    for name in opts:
        if name != "include_usage":
            raise _bad(f"stream_options.{name}", "is not supported", Code.UNSUPPORTED_FIELD)
    include = opts.get("include_usage", False)
    if not isinstance(include, bool):
        raise _bad("stream_options.include_usage", "must be a boolean")
    return stream, include


def _user(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 256:
        raise _bad("user", "must be a string of at most 256 characters")
    return value


_MESSAGE_FIELDS = {
    "system": ("role", "content"),
    "developer": ("role", "content"),
    "user": ("role", "content"),
    "assistant": ("role", "content", "tool_calls"),
    "tool": ("role", "content", "tool_call_id"),
}


def _messages(raw: object) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise _bad("messages", "must be a non-empty array")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "must be an object")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"{where}.role", f"must be one of {sorted(_ROLES)}")
        for name, value in m.items():
            if name not in _MESSAGE_FIELDS[role] and value is not None:
                raise _bad(f"{where}.{name}", "is not supported", Code.UNSUPPORTED_FIELD)
        message: dict[str, Any] = {"role": _ROLES[role]}
        calls = m.get("tool_calls")
        if calls is not None and m.get("content") is None:
            message["content"] = ""  # OpenAI sends null content beside the calls
        else:
            message["content"] = _content(m.get("content"), where)
        if calls is not None:
            message["tool_calls"] = calls
        if role == "tool":
            message["tool_call_id"] = m.get("tool_call_id")
        out.append(message)
    return out


def _content(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(f"{where}.content", "must be a string or an array of text parts")
    texts: list[str] = []
    for j, part in enumerate(value):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            raise _bad(f"{at}.type", 'only "text" parts are supported', Code.UNSUPPORTED_FIELD)
        if set(part) - {"type", "text"}:
            extra = sorted(set(part) - {"type", "text"})[0]
            raise _bad(f"{at}.{extra}", "is not supported", Code.UNSUPPORTED_FIELD)
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad(f"{at}.text", "must be a string")
        texts.append(text)
    return "".join(texts)
