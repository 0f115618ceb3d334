"""Hypothesis strategies for the contract: valid envelopes (as wire maps) and result bodies,
and single-field changes to them (any JSON-like value, or the field removed)."""

from __future__ import annotations

import string
from typing import Any

from hypothesis import strategies as st

from producer.contract.codes import FINISH_REASONS, ErrorCode
from producer.contract.envelope import PROTOCOL_VERSION, ROLES
from producer.contract.fast_path import TOP_FIELDS
from producer.contract.keys import PRIORITIES
from producer.contract.limits import DEFAULT_LIMITS as L

ID_CHARS = string.ascii_letters + string.digits + "_.:-"
NAME_CHARS = string.ascii_letters + string.digits + "_.-/@"
# Any text, multi-byte characters included (emoji, CJK, combining marks).
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
MAX_UNIX_MS = 2**53 - 1

# JSON-like values (no bytes, no NaN or infinities: JSON has none).
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
# Values near the bounds, where the rules differ most.
edge_values = st.sampled_from(
    [0, 1, -1, 2, 2.5, 0.0, 1.0, 3.0, -0.5, 64, 65, 128, 129, 256, 257, 1000, 1001, 32_768,
     32_769, 2**53, 2**63, "", "x", "x" * 65, "x" * 129, "http://a", "ftp://a", [], [""],
     ["x"] * 9, {}, True, False, None, "normal", "urgent", "user", "robot"]
)  # fmt: skip


def _optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


@st.composite
def params(draw: st.DrawFn) -> dict[str, Any] | None:
    if draw(st.booleans()) and draw(st.booleans()):
        return None
    stop_string = st.text(min_size=1, max_size=L.max_stop_chars)
    candidates: dict[str, st.SearchStrategy[Any]] = {
        "max_tokens": st.integers(L.min_max_tokens, L.max_max_tokens),
        "temperature": st.floats(0, L.max_temperature) | st.integers(0, 2),
        "top_p": st.floats(0, 1, exclude_min=True) | st.just(1),
        "top_k": st.integers(0, L.max_top_k),
        "stop": stop_string | st.lists(stop_string, max_size=L.max_stop),
        "seed": _optional(st.integers(0, 2**63 - 1)),
        "ignore_eos": st.booleans(),
        "logprobs": st.integers(0, 20),
        "n": st.integers(1, 16),
    }
    chosen = draw(st.lists(st.sampled_from(sorted(candidates)), unique=True))
    return {name: draw(candidates[name]) for name in chosen}


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid envelope wire map: required fields, and any of the optional ones."""
    env: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": draw(st.text(ID_CHARS, min_size=1, max_size=64)),
        "model": draw(st.text(NAME_CHARS, min_size=1, max_size=128)),
        "messages": draw(
            st.lists(
                st.fixed_dictionaries({"role": st.sampled_from(sorted(ROLES)), "content": TEXT}),
                min_size=1,
                max_size=6,
            )
        ),
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        "params": params(),
        "priority": st.sampled_from(PRIORITIES),
        "tenant": _optional(st.text(min_size=1, max_size=L.max_tenant_chars)),
        "deadline_ms": _optional(st.integers(1, MAX_UNIX_MS)),
        "created_ms": st.integers(0, MAX_UNIX_MS),
        "stream": st.booleans(),
        "idempotency_key": _optional(st.text(min_size=1, max_size=L.max_idempotency_key_chars)),
        "callback_url": _optional(
            st.sampled_from(["http://", "https://"]).map(lambda s: s + "hooks.example/x")
        ),
    }
    for name in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)):
        env[name] = draw(optional[name])
    return env


ABSENT = object()  # a change that removes the field


def paths(env: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Every place one change can go: each field, each message and its fields, each
    sampling field, each stop string, and fields no one knows."""
    out: list[tuple[Any, ...]] = [(name,) for name in sorted(TOP_FIELDS)]
    out += [("beam_width",)]
    for i in range(len(env.get("messages") or [])):
        out += [("messages", i), ("messages", i, "role"), ("messages", i, "content"),
                ("messages", i, "name")]  # fmt: skip
    params = env.get("params")
    if isinstance(params, dict):
        out += [("params", name) for name in (*params, "max_tokens", "stop", "top_p", "beam")]
        if isinstance(params.get("stop"), list):
            out += [("params", "stop", i) for i in range(len(params["stop"]))]
    return out


def changed(env: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A deep copy of ``env`` with ``path`` set to ``value`` (or removed: ABSENT)."""
    import copy

    out = copy.deepcopy(env)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    if value is ABSENT:
        if isinstance(node, dict):
            node.pop(path[-1], None)
        else:
            del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


def _logprob_entries() -> st.SearchStrategy[list[dict[str, Any]]]:
    token = {
        "token": TEXT,
        "logprob": st.floats(-1e4, 0) | st.integers(-100, 0),
        "bytes": st.lists(st.integers(0, 255), max_size=4),
    }
    top = st.lists(st.fixed_dictionaries(token), max_size=3)
    return st.lists(st.fixed_dictionaries(token, optional={"top_logprobs": top}), max_size=3)


def chunk_bodies() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"index": st.integers(0, 2**31), "delta": TEXT},
        optional={"logprobs": _logprob_entries(), "choice": st.integers(0, 15)},
    )


def _choices() -> st.SearchStrategy[list[dict[str, Any]]]:
    choice = st.fixed_dictionaries(
        {
            "index": st.integers(0, 15),
            "text": TEXT,
            "finish_reason": st.sampled_from(FINISH_REASONS),
        },
        optional={"reasoning_content": TEXT, "logprobs": _logprob_entries()},
    )
    return st.lists(choice, max_size=3)


def done_bodies() -> st.SearchStrategy[dict[str, Any]]:
    millis = st.floats(0, 1e9) | st.integers(0, 10**9)
    return st.fixed_dictionaries(
        {"text": TEXT, "finish_reason": st.sampled_from(FINISH_REASONS)},
        optional={
            "usage": st.fixed_dictionaries(
                {},
                optional={
                    n: st.integers(0, 10**6)
                    for n in ("prompt_tokens", "completion_tokens", "cached_tokens")
                },
            ),
            "timings": st.fixed_dictionaries(
                {},
                optional={
                    n: millis for n in ("queued_ms", "first_token_ms", "total_ms", "engine_ms")
                },
            ),
            "worker": TEXT,
            "logprobs": _logprob_entries(),
            "choices": _choices(),
        },
    )


def error_bodies() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"code": st.sampled_from([c.value for c in ErrorCode]), "message": TEXT},
        optional={"worker": TEXT},
    )


def body_paths(body: dict[str, Any]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = [(name,) for name in body]
    out += [("text",), ("index",), ("code",), ("usage",), ("timings",)]
    for part in ("usage", "timings"):
        if isinstance(body.get(part), dict):
            out += [(part, name) for name in (*body[part], "prompt_tokens", "total_ms")]
    for i, choice in enumerate(body.get("choices") or []):
        out += [("choices", i), *(("choices", i, name) for name in (*choice, "index", "text"))]
    for i, entry in enumerate(body.get("logprobs") or []):
        out += [("logprobs", i), *(("logprobs", i, name) for name in (*entry, "top_logprobs"))]
        for j, top in enumerate(entry.get("top_logprobs") or []):
            out += [("logprobs", i, "top_logprobs", j, name) for name in top]
        if entry["bytes"]:
            out += [("logprobs", i, "bytes", 0)]
    return out
