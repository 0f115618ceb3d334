"""OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``GET /v1/models``.

A completion is queued through the gateway's producer path; the answer is awaited (or
streamed as ``chat.completion.chunk`` events) unless the client disconnects first, in which
case the request is cancelled and the engine stops working on it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.chat_body import ChatRequest, parse_chat_body
from gateway.errors import GatewayError
from gateway.http import SSEResponse, json_response, read_json, unless_disconnected
from gateway.limits import Caller
from gateway.responses import ChunkWriter, completion, sse_error
from gateway.served import ServedModel
from gateway.service import Gateway, Queued
from producer.contract.results import Chunk


def gateway_of(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def chat_completions(request: Request) -> Response:
    gw = gateway_of(request)
    caller = await gw.caller(request.headers.get("authorization"))
    body = await read_json(request, gw.settings.max_body_bytes)
    chat = parse_chat_body(body, default_max_tokens=gw.settings.default_max_tokens)
    queued = await gw.queue(
        caller,
        chat,
        stream=chat.stream,
        idempotency_key=request.headers.get("idempotency-key"),
        lease_s=gw.settings.request_timeout_s,
    )
    created_s = int(time.time())
    if chat.stream:
        return SSEResponse(_chunks(gw, caller, queued, chat, created_s))
    answered, result = await unless_disconnected(request, gw.result(queued.request_id))
    if not answered or result is None:
        gw.abandon(caller, queued)
        return Response(status_code=499)  # nobody is listening; for the access log
    gw.finished(caller, queued)
    return json_response(completion(result, chat.model, created_s, chat.logprobs))


async def _chunks(
    gw: Gateway, caller: Caller, queued: Queued, chat: ChatRequest, created_s: int
) -> AsyncIterator[bytes]:
    """The SSE events of one streamed completion; cancels the request if the client leaves
    before the end (this generator is then closed without reaching it)."""
    writer = ChunkWriter(
        queued.request_id, chat.model, created_s, chat.include_usage, chat.logprobs, chat.n
    )
    ended = False
    try:
        yield writer.role()
        async for item in gw.stream_chunks(queued.request_id):
            if isinstance(item, Chunk):
                yield writer.chunk(item)
            else:
                ended = True
                yield writer.finish(item)
    except GatewayError as err:
        ended = True
        yield sse_error(err.body())
    finally:
        if ended:
            gw.finished(caller, queued)
        else:
            gw.abandon(caller, queued)


async def list_models(request: Request) -> Response:
    gw = gateway_of(request)
    await gw.caller(request.headers.get("authorization"))
    return json_response({"object": "list", "data": [_model(m) for m in gw.models.models.values()]})


async def get_model(request: Request) -> Response:
    gw = gateway_of(request)
    model = request.path_params["model"]
    await gw.caller(request.headers.get("authorization"))
    await gw.models.require(model)
    return json_response(_model(gw.models.models[model]))


def _model(m: ServedModel) -> dict[str, object]:
    return {
        "id": m.name,
        "object": "model",
        "created": m.since_s,
        "owned_by": "chatq",
        "context_length": m.context_length,
        "workers": m.workers,
    }


ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
]
"""Plain Starlette routes: the endpoints read the request themselves (no FastAPI
dependency solving on every request)."""
