"""Cancelling a request: the CANCEL call, and the cancel stream's entry.

A request can be cancelled only with its cancel token (``submit`` returns it on the
:class:`~producer.contract.envelope.RequestId`; the HTTP gateway keeps it for its tenant).
CANCEL (``lua/cancel.lua``) checks the token against the digest ENQUEUE stored in the id's
reservation, then sets the ``<prefix>:cancelled:{q<p>}:<id>`` marker (intake skips a queued
request whose marker holds its token) and adds ``{id, token}`` to the cancel stream of the
id's partition (``<prefix>:cancel:{q<p>}``), which every worker reads to abort a running
request. Workers check the token again, so a cancel written without the script, by a client
with raw write access, is ignored.
CANCEL tells a cancel apart from one that came too late and from an id it knows nothing
about (:class:`CancelOutcome`); a wrong token is an error.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from producer.contract.codes import ErrorCode
from producer.contract.keys import CANCEL_MAXLEN, CANCELLED_TTL_S, Keys, partition_tag
from producer.errors import ProtocolError

CANCEL_ID_FIELD = "id"
"""Field of a cancel-stream entry holding the request id."""
CANCEL_TOKEN_FIELD = "token"
"""Field of a cancel-stream entry holding the request's cancel token."""


class CancelOutcome(str, Enum):
    """What a cancel did. True only for ``CANCELLED``, so ``if await client.cancel(rid):``
    reads as "it was cancelled"; the other two wrote nothing."""

    CANCELLED = "cancelled"
    """The request was queued or running: it ends with a ``cancelled`` error result."""
    FINISHED = "finished"
    """It already had its final result (or its reservation expired after one)."""
    UNKNOWN = "unknown"
    """No request has this id: never queued, or its result and reservation have expired."""

    def __bool__(self) -> bool:
        return self is CancelOutcome.CANCELLED


_OUTCOMES = {1: CancelOutcome.CANCELLED, 0: CancelOutcome.FINISHED, -2: CancelOutcome.UNKNOWN}


def cancel_call(keys: Keys, request_id: str, token: str) -> tuple[list[str], list[str | int]]:
    """CANCEL's KEYS (the id's reservation alone: a Redis Cluster client routes the call by
    it; the script names its other keys from the prefix and the partition's tag) and ARGV."""
    tag = partition_tag(keys.partition_of(request_id))
    args: list[str | int] = [keys.prefix, request_id, token, CANCELLED_TTL_S, CANCEL_MAXLEN, tag]
    return [keys.reservation(request_id)], args


def cancel_outcome(reply: Any, request_id: str) -> CancelOutcome:
    """CANCEL's reply as a :class:`CancelOutcome`; :class:`ProtocolError` (``not_owner``)
    when the token is not the request's."""
    status = int(reply)
    outcome = _OUTCOMES.get(status)
    if outcome is None:
        raise ProtocolError(
            ErrorCode.NOT_OWNER.value,
            f"is not the cancel token of request {request_id!r}",
            field="cancel_token",
        )
    return outcome


def check_token(request_id: str, cancel_token: str | None) -> str:
    """The token to cancel ``request_id`` with: ``cancel_token`` or the one ``submit``
    returned on the id; :class:`ProtocolError` naming ``cancel_token`` when there is none."""
    token = cancel_token if cancel_token is not None else getattr(request_id, "cancel_token", "")
    if not isinstance(token, str) or not token:
        raise ProtocolError(
            ErrorCode.NOT_OWNER.value,
            "is required: pass the id submit returned, or its cancel_token",
            field="cancel_token",
        )
    return token
