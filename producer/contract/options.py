"""SubmitOptions: everything a submit call sets besides the messages, in one type.

The async client, the sync client and ``submit_many`` all take these options, as a
:class:`SubmitOptions` or as keyword arguments (its field names, and the sampling fields of
:class:`~gpu_engine.sequence.SamplingParams` directly: ``max_tokens=64``), read here and
nowhere else. Values are checked once, when the envelope they make is validated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from gpu_engine.sequence import InvalidRequestError, SamplingParams
from producer.contract.codes import ErrorCode
from producer.contract.envelope import (
    DEFAULT_SAMPLING,
    EXTRA_SAMPLING_FIELDS,
    WIRE_SAMPLING_FIELDS,
    frozen,
)
from producer.contract.tools import ToolChoice, ToolSpec, tool_choice_from_api, tools_from_api
from producer.errors import ProtocolError


@dataclass(frozen=True)
class SubmitOptions:
    """How to submit one chat. ``deadline_s`` is seconds from the submit (the envelope
    carries the absolute ``deadline_ms``): a request still queued then is dropped with
    ``deadline_exceeded``."""

    model: str
    params: SamplingParams = DEFAULT_SAMPLING
    priority: str = "normal"
    deadline_s: float | None = None
    stream: bool = False
    idempotency_key: str | None = None
    tenant: str | None = None
    callback_url: str | None = None
    result_ttl_s: int | None = None  # keep the result this long (s); None: the worker's
    # Functions the model may call (ToolSpec objects, wire maps or OpenAI's tool objects),
    # how it must choose ("auto", "none", "required" or {"name": ...}), and extra names
    # for the chat template ({"enable_thinking": False}).
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = "auto"
    chat_template_kwargs: Mapping[str, Any] | None = None

    @classmethod
    def from_kwargs(
        cls, kwargs: Mapping[str, Any], base: SubmitOptions | None = None
    ) -> SubmitOptions:
        """``base`` (if any) with ``kwargs`` applied: option names and sampling field names
        (which change ``params``). Raises :class:`ProtocolError` naming an unknown option,
        a missing ``model`` or a ``stop`` that is neither a string nor a list of strings."""
        values: dict[str, Any] = {} if base is None else base.__dict__.copy()
        sampling: dict[str, Any] = {}
        for name, value in kwargs.items():
            if name in _OPTION_FIELDS:
                values[name] = value
            elif name in WIRE_SAMPLING_FIELDS:
                sampling[name] = value
            else:
                raise ProtocolError(
                    ErrorCode.INVALID_REQUEST.value, "is not a submit option", field=name
                )
        if "tools" in kwargs:
            values["tools"] = tools_from_api(kwargs["tools"])
        if "tool_choice" in kwargs:
            values["tool_choice"] = tool_choice_from_api(
                kwargs["tool_choice"], values.get("tools", ())
            )
        if "model" not in values:
            raise ProtocolError(ErrorCode.INVALID_REQUEST.value, "is required", field="model")
        if sampling:
            if "stop" in sampling:
                sampling["stop"] = _stops(sampling["stop"])
            params = values.get("params", DEFAULT_SAMPLING)
            merged = {**params.__dict__, **sampling}
            if _EXTRA_FIELDS.isdisjoint(sampling):
                values["params"] = frozen(SamplingParams, merged)
            else:  # dicts for logit_bias / structured become SamplingParams' own types
                values["params"] = _checked_params(merged)
        # Built without __init__ (a frozen dataclass sets each field through
        # object.__setattr__): a submit's hot path; the envelope's validation checks it all.
        options: SubmitOptions = frozen(cls, {**_DEFAULTS, **values})
        return options


def _checked_params(values: dict[str, Any]) -> SamplingParams:
    try:
        return SamplingParams(**values)
    except InvalidRequestError as err:
        # SamplingParams' messages start with the field's name ("min_p must be ...").
        name = str(err).split(" ", 1)[0]
        field = f"params.{name}" if name.split(".")[0] in WIRE_SAMPLING_FIELDS else "params"
        raise ProtocolError(ErrorCode.INVALID_REQUEST.value, str(err), field=field) from None


_EXTRA_FIELDS = frozenset(EXTRA_SAMPLING_FIELDS)
_OPTION_FIELDS = frozenset(f.name for f in fields(SubmitOptions))
_DEFAULTS = {f.name: f.default for f in fields(SubmitOptions) if f.name != "model"}
OPTION_NAMES = _OPTION_FIELDS | frozenset(WIRE_SAMPLING_FIELDS)
"""Every keyword a submit call takes besides the messages."""


def _stops(stop: object) -> tuple[str, ...]:
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, Sequence) and not isinstance(stop, bytes):
        return tuple(stop)
    raise ProtocolError(
        ErrorCode.INVALID_REQUEST.value, "must be a string or a list of strings", field="stop"
    )
