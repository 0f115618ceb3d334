"""Seeded customer-service chat workload for the spike benchmark.

A shared system prompt of about ``system_tokens`` tokens (shop policies), user turns of
``user_tokens`` tokens drawn uniformly, and answer lengths (``max_tokens``, generated with
``ignore_eos``) drawn uniformly — all from one ``random.Random(seed)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

_POLICY = [
    "Orders ship within two business days from our warehouse in Rotterdam.",
    "Customers may return unused items within 30 days for a full refund to the original card.",
    "Refunds are issued within five business days after the returned parcel is inspected.",
    "Express delivery costs 9.95 and arrives the next business day when ordered before 3 pm.",
    "Password resets are done from the login page; never ask the customer for their password.",
    "Damaged goods: ask for a photo, apologise, and offer a replacement or a refund.",
    "Gift cards cannot be exchanged for cash and are valid for two years.",
    "Loyalty members collect one point per euro spent; 100 points give a 5 euro voucher.",
    "If a parcel shows as delivered but was not received, open a carrier investigation.",
    "Escalate to a human agent when the customer asks for one or mentions legal action.",
    "Be brief, polite and concrete; quote order numbers back to the customer.",
    "Opening hours of the support desk are 8:00 to 20:00 CET, Monday to Saturday.",
]
_USER = [
    "Hi, where is my order {n}?",
    "I ordered a blue jacket last week and it still has not arrived.",
    "The tracking page says delivered but there is nothing at my door.",
    "Can I get a refund for the broken headphones in order {n}?",
    "I forgot my password and the reset email never comes.",
    "How long does express delivery take to Antwerp?",
    "My gift card code {n} is rejected at checkout.",
    "I want to return two shirts that are too small, what do I do?",
    "The parcel arrived damaged, the box was wet and the lamp is cracked.",
    "Do you ship to Switzerland and how much are the customs fees?",
    "I was charged twice for the same order, please fix this.",
    "Can I change the delivery address of order {n} before it ships?",
]


@dataclass(frozen=True)
class ChatRequest:
    index: int
    messages: list[dict[str, str]]
    max_tokens: int


def _grow(rng: random.Random, pool: list[str], tok: Any, target_tokens: int) -> str:
    # Token counts of parts add up to within a token or two of the joined text's count.
    parts: list[str] = []
    count = 0
    while count < target_tokens:
        part = rng.choice(pool).format(n=rng.randint(10_000, 99_999))
        parts.append(part)
        count += len(tok(" " + part)["input_ids"])
    return " ".join(parts)


def system_prompt(tok: Any, tokens: int = 1000, seed: int = 0) -> str:
    return "You are the support assistant of an online shop. Policies: " + _grow(
        random.Random(seed), _POLICY, tok, tokens
    )


def make_requests(
    tok: Any,
    n: int,
    *,
    seed: int = 0,
    system_tokens: int = 1000,
    user_tokens: tuple[int, int] = (20, 200),
    answer_tokens: tuple[int, int] = (50, 400),
) -> list[ChatRequest]:
    rng = random.Random(seed)
    system = system_prompt(tok, system_tokens, seed)
    out = []
    for i in range(n):
        user = _grow(rng, _USER, tok, rng.randint(*user_tokens))
        out.append(
            ChatRequest(
                index=i,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                max_tokens=rng.randint(*answer_tokens),
            )
        )
    return out
