"""Which models live workers serve, from their heartbeats, refreshed in the background.

A request for a model no live worker serves is refused at once (404 ``model_not_found``)
instead of waiting for an answer nobody will write. The view is re-read every
``refresh_s``; a model missing from it is looked up once more before refusing, so a
worker that just started is found without waiting for the next refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.errors import Code, GatewayError
from producer.contract.keys import Keys
from workers.status import live_workers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """One model as ``GET /v1/models`` lists it."""

    name: str
    context_length: int | None  # the smallest max_model_len among its workers
    workers: int
    since_s: int  # Unix seconds the longest-running of its workers started


class ServedModels:
    """The live workers' models (a thin cache over :func:`workers.status.live_workers`)."""

    def __init__(self, redis: Redis, keys: Keys, refresh_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.refresh_s = refresh_s
        self.models: dict[str, ServedModel] = {}
        self._read_at = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_loop(), name="served-models")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> dict[str, ServedModel]:
        workers = await live_workers(self.redis, self.keys)
        found: dict[str, list[tuple[int | None, float]]] = {}
        for w in workers.values():
            cap = w.capacity
            model = cap.get("model")
            if not isinstance(model, str) or cap.get("state") == "draining":
                continue
            length = cap.get("max_model_len")
            started = cap.get("started_s")
            found.setdefault(model, []).append(
                (
                    length if isinstance(length, int) else None,
                    float(started) if isinstance(started, int | float) else time.time(),
                )
            )
        self.models = {
            name: ServedModel(
                name,
                min((n for n, _ in entries if n is not None), default=None),
                len(entries),
                int(min(s for _, s in entries)),
            )
            for name, entries in sorted(found.items())
        }
        self._read_at = time.monotonic()
        return self.models

    async def require(self, model: str) -> None:
        """404 ``model_not_found`` unless a live worker serves ``model``."""
        if model in self.models:
            return
        if time.monotonic() - self._read_at > 0.05:  # at most one look-up per 50 ms
            await self.refresh()
            if model in self.models:
                return
        served = ", ".join(self.models) or "none"
        raise GatewayError(
            Code.MODEL_NOT_FOUND,
            f"no live worker serves model {model!r} (served now: {served})",
            param="model",
        )

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except RedisError as err:
                log.warning("reading worker heartbeats failed: %s", err)
            await asyncio.sleep(self.refresh_s)
