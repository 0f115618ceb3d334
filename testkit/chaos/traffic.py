"""Client traffic for chaos runs: submit streamed chats, read every result stream as a
client would (resuming by chunk index), cancel some, and record what each request got.

Submits retry through Redis outages with the same request id and idempotency key, so a
request is either acknowledged once or counted as never submitted; ``attempted`` holds
every id that may have reached Redis (a final for any other id is "unexpected"). Readers
talk to Redis directly (the workers' proxies are not in their way) and keep, per request,
each chunk index's text as first seen, any index seen more than once, and every final.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from producer import ChatClient
from producer.contract.keys import Keys
from producer.contract.results import Chunk, decode_result
from producer.errors import ChatqError

KEYS = Keys()
MESSAGES = [{"role": "user", "content": "My parcel is late again. What can I do?"}]
READ_BATCH = 64  # result streams per XREAD


@dataclass
class Seen:
    """What a client saw of one request."""

    request_id: str
    submitted_s: float  # monotonic, when the submit was acknowledged
    max_tokens: int
    chunks: dict[int, str] = field(default_factory=dict)  # index → text as first seen
    repeated: list[int] = field(default_factory=list)  # indexes seen more than once
    finals: list[tuple[float, Any]] = field(default_factory=list)  # (monotonic s, Done/Error)
    cancelled: bool = False
    last_id: str = "0-0"

    @property
    def final_s(self) -> float | None:
        return self.finals[0][0] if self.finals else None


class Traffic:
    """Generators and readers against one Redis (see the module doc)."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        rate_per_s: float = 4.0,
        max_tokens: tuple[int, int] = (40, 160),
        cancel_fraction: float = 0.05,
        seed: int = 0,
        prefix: str = "chaos",
        submit_retry_s: float = 30.0,
    ) -> None:
        """Request ids are ``<prefix>-<n>``: experiments on one Redis keep apart. A submit
        Redis does not answer is retried for ``submit_retry_s``, then given up."""
        self.url = url
        self.prefix = prefix
        self.submit_retry_s = submit_retry_s
        self.model = model
        self.rate_per_s = rate_per_s
        self.max_tokens = max_tokens
        self.cancel_fraction = cancel_fraction
        self.rng = random.Random(seed)
        self.attempted: set[str] = set()
        self.seen: dict[str, Seen] = {}
        self.submit_failures = 0
        self.submit_errors: dict[str, str] = {}  # request id -> the last error of a failed one
        self.first_submit = asyncio.Event()  # set once Redis accepted a request
        self._stop_submitting = asyncio.Event()
        self._stop_reading = asyncio.Event()
        self._cancels: set[asyncio.Future[None]] = set()

    async def run(self, duration_s: float, drain_timeout_s: float) -> None:
        """Submit for ``duration_s``, then read until every request has a final (or the
        drain timeout passes)."""
        async with ChatClient(self.url) as client:
            reader = asyncio.ensure_future(self._read_loop())
            submitter = asyncio.ensure_future(self._submit_loop(client))
            await asyncio.sleep(duration_s)
            self._stop_submitting.set()
            await submitter
            await asyncio.gather(*self._cancels)
            deadline = time.monotonic() + drain_timeout_s
            while time.monotonic() < deadline and self.open_requests():
                await asyncio.sleep(0.2)
            self._stop_reading.set()
            await reader

    def open_requests(self) -> list[Seen]:
        return [s for s in self.seen.values() if not s.finals]

    async def _submit_loop(self, client: ChatClient) -> None:
        n = 0
        while not self._stop_submitting.is_set():
            n += 1
            rid = f"{self.prefix}-{n}"
            max_tokens = self.rng.randint(*self.max_tokens)
            cancel = self.rng.random() < self.cancel_fraction
            if await self._submit(client, rid, max_tokens) and cancel:
                self._cancels.add(asyncio.ensure_future(self._cancel_later(client, rid)))
            await asyncio.sleep(self.rng.expovariate(self.rate_per_s))

    async def _submit(self, client: ChatClient, rid: str, max_tokens: int) -> bool:
        """Submit, retrying through outages with the same id, key and body: an attempt that
        reached Redis but whose reply was lost is then a replay, not a new request (a new
        body under the same key would be refused as a mismatch, again and again)."""
        self.attempted.add(rid)
        seed = self.rng.randrange(1 << 30)
        deadline = time.monotonic() + self.submit_retry_s
        last = ""
        while time.monotonic() < deadline:
            try:
                await client.submit(
                    MESSAGES, model=self.model, request_id=rid, idempotency_key=rid,
                    max_tokens=max_tokens, ignore_eos=True, stream=True, seed=seed,
                )  # fmt: skip
            except ChatqError as err:
                last = repr(err)
                await asyncio.sleep(0.5)
                continue
            self.seen[rid] = Seen(rid, time.monotonic(), max_tokens)
            self.first_submit.set()
            return True
        self.submit_failures += 1
        self.submit_errors[rid] = last
        return False

    async def _cancel_later(self, client: ChatClient, rid: str) -> None:
        await asyncio.sleep(self.rng.uniform(0.0, 2.0))
        with contextlib.suppress(ChatqError):
            await client.cancel(rid)
            self.seen[rid].cancelled = True

    async def _read_loop(self) -> None:
        r = aioredis.Redis.from_url(self.url, socket_timeout=5)
        try:
            while not self._stop_reading.is_set():
                open_ = self.open_requests()
                if not open_:
                    await asyncio.sleep(0.05)
                    continue
                for start in range(0, len(open_), READ_BATCH):
                    await self._read(r, open_[start : start + READ_BATCH])
        finally:
            await r.aclose()

    async def _read(self, r: aioredis.Redis, batch: list[Seen]) -> None:
        streams = {KEYS.result(s.request_id): s.last_id for s in batch}
        try:
            reply: Any = await r.xread(streams, count=200, block=100)  # type: ignore[arg-type]
        except (RedisError, OSError):
            await asyncio.sleep(0.2)  # Redis away: read on once it is back
            return
        now_s = time.monotonic()
        by_key = {KEYS.result(s.request_id): s for s in batch}
        for key, entries in reply or []:
            seen = by_key[key.decode() if isinstance(key, bytes) else key]
            for entry_id, fields in entries:
                seen.last_id = entry_id.decode()
                self._note(seen, decode_result(fields), now_s)

    @staticmethod
    def _note(seen: Seen, entry: Any, now_s: float) -> None:
        if isinstance(entry, Chunk):
            if entry.index in seen.chunks:
                seen.repeated.append(entry.index)
            else:
                seen.chunks[entry.index] = entry.delta
        else:
            seen.finals.append((now_s, entry))
