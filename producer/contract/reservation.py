"""A request id's reservation: what ENQUEUE stores under ``<prefix>:id:<id>``, and the checks
workers make against it.

ENQUEUE refuses an id that is reserved, answered or has a result stream, and reserves a
queued request's id with ``"<lane>/<entry id> <cancel digest>"``: the request-stream entry
it was queued as (its lane and stream id: stream ids are per stream, so the same id in
another lane is another entry, which a client may add by hand with an explicit id), and the
SHA-1 of the request's cancel token (empty for none). A worker answers only that entry
(:func:`owner_digest`), and honours a cancel only with that token (:func:`token_matches`),
so raw writes by a client that may add to lanes or to the cancel stream can neither answer
nor cancel someone else's request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_cancel_token() -> str:
    """A request's cancel token: 128 random bits; only its SHA-1 goes to Redis."""
    return secrets.token_hex(16)


def cancel_digest(token: str | bytes) -> str:
    """What the reservation stores for a cancel token (Lua's ``redis.sha1hex``)."""
    raw = token if isinstance(token, bytes) else token.encode("utf-8", "surrogatepass")
    return hashlib.sha1(raw, usedforsecurity=False).hexdigest()


def entry_place(lane: str, entry_id: str) -> str:
    """How a reservation names an entry: ``<lane>/<entry id>`` (the Lua scripts build the
    same string; an entry id has no ``/``)."""
    return f"{lane}/{entry_id}"


def reservation_value(lane: str, entry_id: str, digest: str = "") -> str:
    """What ENQUEUE stores under ``<prefix>:id:<id>`` for the entry ``entry_id`` of
    ``lane`` and a cancel token's ``digest`` (``""``: none)."""
    return f"{entry_place(lane, entry_id)} {digest}"


def owner_digest(reservation: bytes | str | None, lane: str, entry_id: str) -> str | None:
    """The cancel digest of the request whose id ENQUEUE reserved for this entry of this
    lane (``""`` when it has none); None when the reservation names another entry (of this
    lane or another) or none exists."""
    if reservation is None:
        return None
    value = reservation.decode("utf-8", "replace") if isinstance(reservation, bytes) else (
        reservation)  # fmt: skip
    place, _, digest = value.rpartition(" ")
    return digest if place == entry_place(lane, entry_id) else None


def token_matches(token: bytes | str | None, digest: str) -> bool:
    """True when ``token`` is the cancel token whose SHA-1 the reservation holds."""
    if token is None or not digest:
        return False
    return hmac.compare_digest(cancel_digest(token), digest)
