"""HTTP plumbing shared by the routes: bounded JSON bodies, JSON answers, SSE responses
that notice a client going away, and waiting for an answer unless the client leaves first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.errors import Code, GatewayError

T = TypeVar("T")


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


def error_response(err: GatewayError) -> Response:
    return json_response(err.body(), err.answer.status, err.headers())


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body as JSON; 413 past ``max_bytes`` (read no further), 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise GatewayError(Code.BODY_TOO_LARGE, f"the body is over {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise GatewayError(Code.BODY_TOO_LARGE, f"the body is over {max_bytes} bytes")
        chunks.append(chunk)
    try:
        return orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as err:
        raise GatewayError(Code.INVALID_JSON, f"the body is not valid JSON ({err})") from err


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone (the request body was read before)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Await ``work`` unless the client disconnects first: (True, result), or (False, None)
    with ``work`` cancelled."""
    result: T | None = None
    with anyio.CancelScope() as scope:
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request.receive, scope))
        try:
            result = await work
        finally:
            watcher.cancel()
        return True, result
    return False, None


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    await _disconnected(receive)
    scope.cancel()


class SSEResponse(Response):
    """A ``text/event-stream`` response that stops its iterator when the client goes away
    (whatever ASGI version the server speaks), so the iterator's ``finally`` can act."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str] | None = None):
        # No body: Response.__init__ would declare content-length 0.
        self.status_code = 200
        self.background = None
        self.init_headers(
            {"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})}
        )
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def stream() -> None:
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
                async for event in self.events:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()

            async def watch() -> None:
                await _disconnected(receive)
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            tg.start_soon(watch)
        aclose = getattr(self.events, "aclose", None)
        if aclose is not None:
            await aclose()
