"""Standard Webhooks signatures, checked against the official openai package's verifier."""

from __future__ import annotations

import time

import openai
import pytest

from gateway import signing
from gateway.tenants import new_webhook_secret


def test_signature_verifies_with_openai_package() -> None:
    secret = new_webhook_secret()
    body = b'{"type":"chat.completion.job.done"}'
    headers = signing.headers(secret, "req-1", int(time.time()), body)
    client = openai.OpenAI(api_key="unused")
    client.webhooks.verify_signature(body, headers, secret=secret)
    assert signing.verify(
        secret, "req-1", int(headers["webhook-timestamp"]), body, headers["webhook-signature"]
    )
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(body + b" ", headers, secret=secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(body, headers, secret=new_webhook_secret())
