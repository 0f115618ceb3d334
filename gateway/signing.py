"""Standard Webhooks signatures: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``.

The signature is ``v1,`` + base64(HMAC-SHA256(secret, "<id>.<timestamp>.<body>")), where the
secret is the tenant's ``whsec_<base64>`` decoded; receivers verify with any Standard
Webhooks library (the official ``openai`` package's ``webhooks.verify_signature`` does).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

SECRET_PREFIX = "whsec_"


def secret_bytes(secret: str) -> bytes:
    raw = secret[len(SECRET_PREFIX) :] if secret.startswith(SECRET_PREFIX) else secret
    return base64.b64decode(raw)


def sign(secret: str, msg_id: str, timestamp_s: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp_s}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secret: str, msg_id: str, timestamp_s: int, body: bytes) -> dict[str, str]:
    """The three headers of one signed delivery (plus its content type)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp_s),
        "webhook-signature": sign(secret, msg_id, timestamp_s, body),
        "content-type": "application/json",
    }


def verify(secret: str, msg_id: str, timestamp_s: int, body: bytes, signature_header: str) -> bool:
    """Whether any ``v1`` signature in the (space-separated) header matches."""
    expected = sign(secret, msg_id, timestamp_s, body)
    return any(hmac.compare_digest(expected, s) for s in signature_header.split())
