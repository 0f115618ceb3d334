"""JSON Schemas (Draft 2020-12) of the request envelope and of each result entry's body.

Built from the contract's own constants (:class:`Limits`, the patterns, the enums), so they
cannot drift from the validator; ``docs/schema/*.schema.json`` are these, written out by
``python -m producer.contract.schema docs/schema`` (a test checks the files are current).
The schemas describe msgpack documents in JSON terms. What JSON cannot say, the validator
adds (``docs/protocol.md`` lists it): an integer must be a msgpack integer (``1.0`` is not
one), floats must be finite, and the contents of all messages together have at most
``max_total_chars`` characters and the encoded envelope at most ``max_payload_bytes``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from gpu_engine.sequence import MAX_N, MAX_TOP_LOGPROBS, STRUCTURED_KINDS
from producer.contract.codes import FINISH_REASONS, ErrorCode
from producer.contract.envelope import ID_PATTERN, NAME_PATTERN, PROTOCOL_VERSION, ROLES
from producer.contract.keys import PRIORITIES
from producer.contract.limits import DEFAULT_LIMITS, Limits
from producer.contract.tools import (
    CALL_ID_PATTERN,
    MAX_ARGUMENTS_CHARS,
    MAX_DESCRIPTION_CHARS,
    MAX_TEMPLATE_KWARGS,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
    RESERVED_TEMPLATE_KWARGS,
    TEMPLATE_KWARG_PATTERN,
    TOOL_CHOICE_MODES,
    TOOL_NAME_PATTERN,
)

DRAFT = "https://json-schema.org/draft/2020-12/schema"
MAX_UNIX_MS = 2**53 - 1
MAX_SEED = 2**63 - 1


def _string(max_chars: int, pattern: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": max_chars}
    if pattern is not None:
        out["pattern"] = pattern
    return out


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "type": [schema["type"], "null"]}


def _integer(minimum: int, maximum: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def _params(limits: Limits) -> dict[str, Any]:
    stop_string = _string(limits.max_stop_chars)
    return {
        "type": ["object", "null"],
        "description": "Sampling parameters; null or absent: every default.",
        "additionalProperties": False,
        "properties": {
            "max_tokens": {
                **_integer(limits.min_max_tokens, limits.max_max_tokens),
                "default": 256,
            },
            "temperature": {
                "type": "number",
                "minimum": 0,
                "maximum": limits.max_temperature,
                "default": 1.0,
                "description": "0 = greedy",
            },
            "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1.0},
            "top_k": {**_integer(0, limits.max_top_k), "default": 0, "description": "0 = off"},
            "stop": {
                "anyOf": [
                    stop_string,
                    {"type": "array", "maxItems": limits.max_stop, "items": stop_string},
                ],
                "default": [],
                "description": "Stop strings (one string is a list of one); the answer ends "
                "before the first one generated.",
            },
            "seed": {**_nullable(_integer(0, MAX_SEED)), "default": None},
            "ignore_eos": {"type": "boolean", "default": False},
            **_extra_params(limits),
        },
    }


def _extra_params(limits: Limits) -> dict[str, Any]:
    """The optional sampling fields (sent only when not at their defaults)."""
    penalty = {"type": "number", "minimum": -2, "maximum": 2, "default": 0.0}
    return {
        "presence_penalty": {**penalty, "description": "minus this once per generated token"},
        "frequency_penalty": {**penalty, "description": "minus this per occurrence"},
        "repetition_penalty": {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 2,
            "default": 1.0,
            "description": "prompt and output tokens: positive logits / it, negative * it",
        },
        "min_p": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.0},
        "logit_bias": {
            "type": "object",
            "maxProperties": limits.max_logit_bias,
            "propertyNames": {"pattern": "^[0-9]{1,10}$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            "description": "token id (decimal string) -> added to its logit",
        },
        "stop_token_ids": {
            "type": "array",
            "maxItems": limits.max_stop_token_ids,
            "items": _integer(0, 2**31 - 1),
        },
        "structured": {
            "type": "object",
            "required": ["kind"],
            "additionalProperties": False,
            "properties": {
                "kind": {"enum": list(STRUCTURED_KINDS)},
                "spec": {"type": "string", "maxLength": limits.max_structured_chars},
                "prefix": {"type": "string", "maxLength": limits.max_structured_affix_chars},
                "suffix": {"type": "string", "maxLength": limits.max_structured_affix_chars},
            },
            "description": "constrained decoding: json (spec: a JSON schema as text, empty: "
            "any object), regex, or grammar (EBNF); between literal prefix and suffix",
        },
        "logprobs": {
            **_integer(0, MAX_TOP_LOGPROBS),
            "description": "report each token's log probability and this many most likely "
            "alternatives (results' logprobs)",
        },
        "n": {
            **_integer(1, MAX_N),
            "default": 1,
            "description": "how many answers to generate for the prompt (results' choices)",
        },
    }


def _messages(limits: Limits) -> dict[str, Any]:
    return {
        "type": "array",
        "minItems": 1,
        "maxItems": limits.max_messages,
        "items": {
            "type": "object",
            "required": ["role", "content"],
            "additionalProperties": False,
            "properties": {
                "role": {"enum": sorted(ROLES)},
                "content": {"type": "string", "maxLength": limits.max_content_chars},
                "tool_calls": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_TOOL_CALLS,
                    "items": _tool_call(),
                    "description": "Only on an assistant message: the calls it made.",
                },
                "tool_call_id": {
                    **_string(64, f"^{CALL_ID_PATTERN.pattern}$"),
                    "description": "Only on a tool message: the call it answers.",
                },
            },
            "allOf": [
                {
                    "if": {"required": ["tool_calls"]},
                    "then": {"properties": {"role": {"const": "assistant"}}},
                },
                {
                    "if": {"required": ["tool_call_id"]},
                    "then": {"properties": {"role": {"const": "tool"}}},
                },
            ],
        },
        "description": f"At most {limits.max_total_chars} characters of content in all.",
    }


def _tool_call() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["id", "name", "arguments"],
        "additionalProperties": False,
        "properties": {
            "id": _string(64, f"^{CALL_ID_PATTERN.pattern}$"),
            "name": _string(64, f"^{TOOL_NAME_PATTERN.pattern}$"),
            "arguments": {
                "type": "string",
                "maxLength": MAX_ARGUMENTS_CHARS,
                "description": "The arguments object as JSON text.",
            },
        },
    }


def _tool_fields() -> dict[str, Any]:
    name = _string(64, f"^{TOOL_NAME_PATTERN.pattern}$")
    return {
        "tools": {
            "type": "array",
            "maxItems": MAX_TOOLS,
            "description": "Functions the model may call (names unique).",
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": name,
                    "description": {"type": "string", "maxLength": MAX_DESCRIPTION_CHARS},
                    "parameters": {"type": "object", "description": "A JSON Schema."},
                },
            },
        },
        "tool_choice": {
            "anyOf": [
                {"enum": list(TOOL_CHOICE_MODES)},
                {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"name": name},
                },
            ],
            "default": "auto",
            "description": "'required' needs tools; a name must be one of the tools.",
        },
        "chat_template_kwargs": {
            "type": "object",
            "maxProperties": MAX_TEMPLATE_KWARGS,
            "propertyNames": {
                "pattern": f"^{TEMPLATE_KWARG_PATTERN.pattern}$",
                "not": {"enum": sorted(RESERVED_TEMPLATE_KWARGS)},
            },
            "additionalProperties": {"type": ["boolean", "number", "string", "null"]},
            "description": "Extra names for the chat template (enable_thinking...).",
        },
    }


def envelope_schema(limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The request envelope: the msgpack map in field ``m`` of a request-stream entry."""
    return {
        "$schema": DRAFT,
        "$id": "urn:chatq:schema:envelope",
        "title": f"chatq request envelope, protocol version {PROTOCOL_VERSION}",
        "type": "object",
        "required": ["v", "id", "model", "messages"],
        "additionalProperties": False,
        "properties": {
            "v": {"type": "integer", "const": PROTOCOL_VERSION},
            "id": {**_string(64, f"^{ID_PATTERN.pattern}$"), "description": "Request id."},
            "model": _string(128, f"^{NAME_PATTERN.pattern}$"),
            "messages": _messages(limits),
            "params": _params(limits),
            "priority": {"enum": list(PRIORITIES), "default": "normal"},
            "tenant": {**_nullable(_string(limits.max_tenant_chars)), "default": None},
            "deadline_ms": {
                **_nullable(_integer(1, MAX_UNIX_MS)),
                "default": None,
                "description": "Unix epoch milliseconds; still queued then: deadline_exceeded.",
            },
            "created_ms": {
                **_integer(0, MAX_UNIX_MS),
                "default": 0,
                "description": "Unix epoch milliseconds when the producer built the request.",
            },
            "stream": {"type": "boolean", "default": False},
            "idempotency_key": {
                **_nullable(_string(limits.max_idempotency_key_chars)),
                "default": None,
            },
            "callback_url": {
                **_nullable(_string(limits.max_callback_url_chars, "^https?://")),
                "default": None,
            },
            "result_ttl_s": {
                **_nullable(_integer(1, limits.max_result_ttl_s)),
                "default": None,
                "description": "seconds the result is kept; null: the worker's default",
            },
            **_tool_fields(),
        },
    }


def _result(name: str, title: str, body: dict[str, Any], required: list[str]) -> dict[str, Any]:
    # Readers ignore fields they do not know (a newer worker may add some), so no
    # additionalProperties: false here, unlike the envelope (a worker must not seem to
    # honour an option it does not know).
    return {
        "$schema": DRAFT,
        "$id": f"urn:chatq:schema:result-{name}",
        "title": title,
        "type": "object",
        "required": required,
        "properties": body,
    }


def result_schemas() -> dict[str, dict[str, Any]]:
    """The msgpack body (field ``m``) of each result-entry type (field ``t``)."""
    return {
        "chunk": _result(
            "chunk",
            "chatq result entry t=chunk: a streamed text delta",
            _chunk_body(),
            ["index", "delta"],
        ),
        "done": _result(
            "done",
            "chatq result entry t=done: the final answer",
            _done_body(),
            ["text", "finish_reason"],
        ),
        "error": _result(
            "error",
            "chatq result entry t=error: the final error",
            {
                "code": {
                    "type": "string",
                    "minLength": 1,
                    "description": "One of: "
                    + ", ".join(c.value for c in ErrorCode)
                    + " (a reader treats a code it does not know as an error all the same).",
                },
                "message": {"type": "string"},
                "worker": {"type": "string", "default": ""},
            },
            ["code", "message"],
        ),
    }


def _chunk_body() -> dict[str, Any]:
    return {
        "index": {"type": "integer", "minimum": 0, "description": "From 0, +1 a chunk."},
        "delta": {"type": "string"},
        "tokens": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0},
            "default": [],
            "description": "Ids of the tokens generated since the previous chunk "
            "(a worker resuming the request reads them).",
        },
        "reasoning": {"type": "string", "default": "", "description": "Reasoning text."},
        "tool_calls": {"type": "array", "items": _result_call(), "default": []},
        "logprobs": _logprobs("One per token of tokens (params.logprobs)."),
        "choice": {
            "type": "integer",
            "minimum": 0,
            "default": 0,
            "description": "The answer it continues (params.n > 1).",
        },
    }


def _done_body() -> dict[str, Any]:
    counts = {"type": "integer", "minimum": 0, "default": 0}
    millis = {"type": "number", "minimum": 0, "default": 0.0}
    return {
        "text": {"type": "string"},
        "finish_reason": {"enum": list(FINISH_REASONS)},
        "usage": _object(
            {n: counts for n in ("prompt_tokens", "completion_tokens", "cached_tokens")}
        ),
        "timings": _object(
            {n: millis for n in ("queued_ms", "first_token_ms", "total_ms", "engine_ms")}
        ),
        "worker": {"type": "string", "default": ""},
        "reasoning_content": {"type": "string", "default": ""},
        "tool_calls": {"type": "array", "items": _result_call(), "default": []},
        "logprobs": _logprobs("One per generated token (params.logprobs)."),
        "choices": {
            "type": "array",
            "items": _choice(),
            "default": [],
            "description": "Every answer of a request for params.n > 1.",
        },
    }


def _result_call() -> dict[str, Any]:
    text = {"type": "string"}
    return {
        "type": "object",
        "required": ["id", "name", "arguments"],
        "properties": {"id": text, "name": text, "arguments": text},
    }


def _choice() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["index", "text", "finish_reason"],
        "properties": {
            "index": {"type": "integer", "minimum": 0},
            "text": {"type": "string"},
            "finish_reason": {"enum": list(FINISH_REASONS)},
            "reasoning_content": {"type": "string", "default": ""},
            "tool_calls": {"type": "array", "items": _result_call(), "default": []},
            "logprobs": _logprobs("One per token of this answer."),
        },
    }


def _logprobs(description: str) -> dict[str, Any]:
    """OpenAI's ChatCompletionTokenLogprob entries."""
    token: dict[str, Any] = {
        "type": "object",
        "required": ["token", "logprob", "bytes"],
        "properties": {
            "token": {"type": "string"},
            "logprob": {"type": "number", "maximum": 0},
            "bytes": {"type": "array", "items": _integer(0, 255)},
        },
    }
    entry = {
        **token,
        "properties": {
            **token["properties"],
            "top_logprobs": {"type": "array", "items": token, "default": []},
        },
    }
    return {"type": "array", "items": entry, "default": [], "description": description}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties}


def schema_files() -> dict[str, dict[str, Any]]:
    """File name → schema, as in ``docs/schema/``."""
    files = {"envelope.schema.json": envelope_schema()}
    for kind, schema in result_schemas().items():
        files[f"result-{kind}.schema.json"] = schema
    return files


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    """Write every schema file into the directory ``argv[0]``."""
    if len(argv) != 1:
        print("usage: python -m producer.contract.schema DIRECTORY", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, schema in schema_files().items():
        (out / name).write_text(render(schema), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
