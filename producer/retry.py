"""Retrying a submit the queue refused: wait as each :class:`QueueFull` says, within a budget.

ENQUEUE's retry hint already spreads waiting callers over time (each refused caller is told
a later time than the one before, by what the queue drains meanwhile) and the client adds
jitter, so callers that follow it come back one by one instead of all at once.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from producer.errors import ChatqError, QueueFull

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long :meth:`ChatClient.submit_retrying` keeps trying: at most ``max_wait_s`` of
    waiting in all and ``max_attempts`` tries."""

    max_wait_s: float = 300.0
    max_attempts: int = 1000

    def __post_init__(self) -> None:
        if not (isinstance(self.max_wait_s, int | float) and 0 <= self.max_wait_s < float("inf")):
            raise ChatqError(f"max_wait_s must be a finite number >= 0: {self.max_wait_s!r}")
        if isinstance(self.max_attempts, bool) or not (
            isinstance(self.max_attempts, int) and self.max_attempts >= 1
        ):
            raise ChatqError(f"max_attempts must be an integer >= 1: {self.max_attempts!r}")


async def retrying(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[None]],
) -> T:
    """``attempt()`` until it does not raise :class:`QueueFull`, sleeping its hint between
    tries; the last :class:`QueueFull` once the policy's budget would be passed."""
    waited_s = 0.0
    for tries in range(1, policy.max_attempts + 1):
        try:
            return await attempt()
        except QueueFull as full:
            if tries == policy.max_attempts or waited_s + full.retry_after_s > policy.max_wait_s:
                raise
            await sleep(full.retry_after_s)
            waited_s += full.retry_after_s
    raise AssertionError("unreachable")


def retrying_sync(attempt: Callable[[], T], policy: RetryPolicy) -> T:
    """:func:`retrying` for the blocking client."""
    waited_s = 0.0
    for tries in range(1, policy.max_attempts + 1):
        try:
            return attempt()
        except QueueFull as full:
            if tries == policy.max_attempts or waited_s + full.retry_after_s > policy.max_wait_s:
                raise
            time.sleep(full.retry_after_s)
            waited_s += full.retry_after_s
    raise AssertionError("unreachable")
