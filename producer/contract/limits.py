"""The bounds every request envelope is validated against."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Bounds every request is validated against (defaults suit a chat service).

    Character counts are Unicode code points (Python's ``len``), not bytes or UTF-16 units.
    """

    max_payload_bytes: int = 1 << 20
    max_messages: int = 256
    max_content_chars: int = 200_000
    max_total_chars: int = 400_000
    min_max_tokens: int = 1
    max_max_tokens: int = 32_768
    max_temperature: float = 2.0
    max_top_k: int = 1_000
    max_stop: int = 8
    max_stop_chars: int = 256
    max_stop_token_ids: int = 16
    max_logit_bias: int = 300  # entries, as OpenAI's
    max_structured_chars: int = 65_536  # a JSON schema / regex / grammar, as text
    max_structured_affix_chars: int = 256  # literal text before / after it
    max_tenant_chars: int = 64
    max_idempotency_key_chars: int = 128
    max_callback_url_chars: int = 2_048
    max_result_ttl_s: int = 7 * 86_400
    # A deadline (``deadline_s``, from now) shorter than this is certain to pass before any
    # answer: a pull, a prefill and a write take longer. The longest keeps deadline_ms a
    # plausible Unix time.
    min_deadline_s: float = 0.05
    max_deadline_s: float = 366 * 86_400


DEFAULT_LIMITS = Limits()
