"""The envelope check for the common shape, without naming fields: most of a worker's
validation cost.

The same checks as :func:`producer.contract.validation.check_map`, with exact types
(msgpack gives exactly dict / list / str / int / float / bool / None), and the objects
built with :func:`~producer.contract.envelope.frozen`. Anything unusual (a wrong type, a
value out of bounds, ``stop`` as one string, an int subclass...) returns None and goes
through the full check, which names the bad field; so this path accepts nothing the full
check refuses and builds the same Envelope (pinned by a property test).
"""

from __future__ import annotations

from typing import Any

from gpu_engine.sequence import SamplingParams
from producer.contract.envelope import (
    BASIC_SAMPLING_FIELDS,
    DEFAULT_SAMPLING,
    ID_PATTERN,
    NAME_PATTERN,
    PROTOCOL_VERSION,
    ROLES,
    Envelope,
    Message,
    frozen,
)
from producer.contract.keys import PRIORITIES
from producer.contract.limits import Limits

TOP_FIELDS = frozenset(
    {
        "v",
        "id",
        "model",
        "messages",
        "params",
        "priority",
        "tenant",
        "deadline_ms",
        "created_ms",
        "stream",
        "idempotency_key",
        "callback_url",
        "result_ttl_s",
    }
)
# Params with an optional field (penalties, structured...) take the full check.
_PARAM_FIELDS = frozenset(BASIC_SAMPLING_FIELDS)
_id_ok = ID_PATTERN.fullmatch
_name_ok = NAME_PATTERN.fullmatch


def _short_str(x: object, max_chars: int) -> bool:
    return type(x) is str and 0 < len(x) <= max_chars


_SAMPLING_DEFAULTS = dict(DEFAULT_SAMPLING.__dict__)


def _fast_params(raw: object, limits: Limits) -> SamplingParams | None:
    if raw is None:
        return DEFAULT_SAMPLING
    if type(raw) is not dict or not _PARAM_FIELDS.issuperset(raw):
        return None
    get = raw.get
    d = DEFAULT_SAMPLING
    max_tokens = get("max_tokens", d.max_tokens)
    temperature = get("temperature", d.temperature)
    top_p = get("top_p", d.top_p)
    top_k = get("top_k", d.top_k)
    stop = get("stop", [])
    seed = get("seed")
    ignore_eos = get("ignore_eos", False)
    if not (
        type(max_tokens) is int
        and limits.min_max_tokens <= max_tokens <= limits.max_max_tokens
        and type(top_k) is int
        and 0 <= top_k <= limits.max_top_k
        and type(ignore_eos) is bool
        and (seed is None or (type(seed) is int and 0 <= seed < 2**63))
        and type(stop) is list
        and len(stop) <= limits.max_stop
    ):
        return None
    # A float out of range is refused here, NaN and infinities too (comparisons fail).
    t = type(temperature)
    if not ((t is float or t is int) and 0.0 <= temperature <= limits.max_temperature):
        return None
    t = type(top_p)
    if not ((t is float or t is int) and 0.0 < top_p <= 1.0):
        return None
    max_stop_chars = limits.max_stop_chars
    for s in stop:
        if not (type(s) is str and 0 < len(s) <= max_stop_chars):
            return None
    params: SamplingParams = frozen(
        SamplingParams,
        {
            **_SAMPLING_DEFAULTS,
            "max_tokens": max_tokens,
            "temperature": float(temperature),
            "top_p": float(top_p),
            "top_k": top_k,
            "seed": seed,
            "stop": tuple(stop),
            "stop_token_ids": (),
            "ignore_eos": ignore_eos,
        },
    )
    return params


def _fast_messages(raw_messages: list[Any], limits: Limits) -> tuple[Message, ...] | None:
    messages: list[Message] = []
    total = 0
    max_content_chars = limits.max_content_chars
    for m in raw_messages:
        if type(m) is not dict or len(m) != 2:
            return None
        role = m.get("role")
        content = m.get("content")
        if not (
            type(role) is str
            and role in ROLES
            and type(content) is str
            and len(content) <= max_content_chars
        ):
            return None
        total += len(content)
        messages.append(frozen(Message, {"role": role, "content": content}))
    if total > limits.max_total_chars:
        return None
    return tuple(messages)


def _fast_top(get: Any, limits: Limits) -> tuple[Any, ...] | None:
    """The top-level fields other than messages and params, if all have their common
    shape: (v, id, model, priority, tenant, deadline_ms, created_ms, stream,
    idempotency_key, callback_url, result_ttl_s)."""
    v = get("v")
    request_id = get("id")
    model = get("model")
    priority = get("priority", "normal")
    tenant = get("tenant")
    deadline_ms = get("deadline_ms")
    created_ms = get("created_ms", 0)
    stream = get("stream", False)
    idem = get("idempotency_key")
    callback_url = get("callback_url")
    result_ttl_s = get("result_ttl_s")
    if (
        type(v) is int
        and v == PROTOCOL_VERSION
        and _short_str(request_id, 64)
        and _id_ok(request_id)
        and _short_str(model, 128)
        and _name_ok(model)
        and type(priority) is str
        and priority in PRIORITIES
        and (tenant is None or _short_str(tenant, limits.max_tenant_chars))
        and (deadline_ms is None or (type(deadline_ms) is int and 0 < deadline_ms < 2**53))
        and type(created_ms) is int
        and 0 <= created_ms < 2**53
        and type(stream) is bool
        and (idem is None or _short_str(idem, limits.max_idempotency_key_chars))
        and (
            callback_url is None
            or (
                _short_str(callback_url, limits.max_callback_url_chars)
                and callback_url.startswith(("http://", "https://"))
            )
        )
        and (
            result_ttl_s is None
            or (type(result_ttl_s) is int and 0 < result_ttl_s <= limits.max_result_ttl_s)
        )
    ):
        return (v, request_id, model, priority, tenant, deadline_ms, created_ms, stream, idem,
                callback_url, result_ttl_s)  # fmt: skip
    return None


def fast_envelope(obj: object, limits: Limits) -> Envelope | None:
    """``validate_map(obj)`` for the common shape; None: let the full check decide."""
    if type(obj) is not dict or not TOP_FIELDS.issuperset(obj):
        return None
    get = obj.get
    raw_messages = get("messages")
    if not (type(raw_messages) is list and 0 < len(raw_messages) <= limits.max_messages):
        return None
    top = _fast_top(get, limits)
    if top is None:
        return None
    messages = _fast_messages(raw_messages, limits)
    if messages is None:
        return None
    params = _fast_params(get("params"), limits)
    if params is None:
        return None
    v, request_id, model, priority, tenant, deadline_ms, created_ms, stream, idem, url, ttl = top
    env: Envelope = frozen(
        Envelope,
        {
            "id": request_id,
            "model": model,
            "messages": messages,
            "params": params,
            "priority": priority,
            "tenant": tenant,
            "deadline_ms": deadline_ms,
            "created_ms": created_ms,
            "stream": stream,
            "idempotency_key": idem,
            "callback_url": url,
            "result_ttl_s": ttl,
            "v": v,
        },
    )
    return env
