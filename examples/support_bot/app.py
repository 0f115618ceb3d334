"""The bot's web server: the chat page, and ``POST /api/chat`` streaming one turn's events
(server-sent events) from :class:`~examples.support_bot.bot.SupportBot`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from examples.support_bot.bot import Event, SupportBot

PAGE = Path(__file__).with_name("page.html")
MAX_TURNS = 40
MAX_CHARS = 2_000


def make_app(bot: SupportBot) -> Starlette:
    """The page and the chat endpoint, over ``bot``."""

    async def page(_: Request) -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def chat(request: Request) -> Response:
        try:
            history = _history(json.loads(await request.body()))
        except ValueError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        return StreamingResponse(_events(bot, history), media_type="text/event-stream")

    return Starlette(routes=[Route("/", page), Route("/api/chat", chat, methods=["POST"])])


async def _events(bot: SupportBot, history: list[dict[str, str]]) -> AsyncIterator[bytes]:
    try:
        async for event in bot.turn(history):
            yield event.sse()
    except Exception as err:  # the gateway refused or failed: the page shows it
        yield Event("error", {"message": f"{type(err).__name__}: {err}"}).sse()


def _history(body: object) -> list[dict[str, str]]:
    """The conversation the page sends: user and assistant texts, the user's last."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not 0 < len(messages) <= MAX_TURNS:
        raise ValueError(f"messages must be a list of 1 to {MAX_TURNS} turns")
    out = []
    for m in messages:
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("user", "assistant")
            or not isinstance(m.get("content"), str)
            or len(m["content"]) > MAX_CHARS
        ):
            raise ValueError(f"each turn is {{role: user|assistant, content: text ≤ {MAX_CHARS}}}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise ValueError("the last turn must be the customer's")
    return out
