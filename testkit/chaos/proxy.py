"""A TCP proxy on 127.0.0.1 that the chaos harness puts between workers and Redis.

It forwards bytes both ways and can add latency (``delay_s``: each piece of data waits that
long before it is passed on, in order), partition (``partition``: connections stay open but
nothing passes, so clients see timeouts; ``heal`` then cuts the connections, as TCP gives up
on a long partition, and what was held back is dropped), or cut every connection at once
(``reset``). It runs its own event loop in a daemon thread, so the code
that drives faults can be synchronous or asynchronous.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

from workers.redis_server import free_port

READ_BYTES = 65536


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream_host:upstream_port`` (see module doc)."""

    def __init__(self, upstream_host: str, upstream_port: int, *, port: int | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.delay_s = 0.0
        self.partitioned = False
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="proxy")

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> TcpProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def reset(self) -> None:
        """Cut every open connection (clients reconnect through the proxy)."""
        asyncio.run_coroutine_threadsafe(self._cut(), self._loop).result(10)

    def partition(self) -> None:
        """Let nothing through (new connections are accepted but stall too)."""
        self.partitioned = True

    def heal(self) -> None:
        """End a partition: the stalled connections are cut (their data dropped)."""
        asyncio.run_coroutine_threadsafe(self._cut(), self._loop).result(10)
        self.partitioned = False

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _cut(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        self._writers |= {client_w, upstream_w}
        try:
            await asyncio.gather(self._pipe(client_r, upstream_w), self._pipe(upstream_r, client_w))
        except asyncio.CancelledError:
            pass  # the proxy is stopping
        finally:
            for w in (client_w, upstream_w):
                self._writers.discard(w)
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction; data waits ``delay_s`` (in order), and while partitioned."""
        pending: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(pending, writer))
        try:
            while True:
                data = await reader.read(READ_BYTES)
                if not data:
                    break
                pending.put_nowait((time.monotonic() + self.delay_s, data))
        except (ConnectionError, OSError):
            pass
        finally:
            pending.put_nowait(None)
            with contextlib.suppress(Exception):
                await sender
            writer.close()

    async def _send(self, pending: asyncio.Queue[Any], writer: asyncio.StreamWriter) -> None:
        while (item := await pending.get()) is not None:
            due_s, data = item
            wait_s = due_s - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            while self.partitioned:
                if writer.is_closing():
                    return  # cut by ``heal``: what was held back is dropped
                await asyncio.sleep(0.02)
            if writer.is_closing():
                return
            writer.write(data)
            await writer.drain()
