"""The job API: queue a chat and come back for it (or be called back).

``POST /v1/jobs`` (202 with the job), ``GET /v1/jobs/{id}``, ``GET /v1/jobs/{id}/events``
(SSE: one ``chunk`` event per text delta, id = its index, then ``done`` or ``error`` with
the job; resume with ``Last-Event-ID``), ``DELETE /v1/jobs/{id}`` (cancel: the job with
``cancelled`` true, or false when it had finished; 404 when the queue no longer knows the
request). A job outlives the connection that created it: a client leaving an events stream
cancels nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.chat_body import parse_chat_body
from gateway.errors import Code, GatewayError
from gateway.http import SSEResponse, json_response, read_json
from gateway.jobs import JobRecord, JobState
from gateway.openai_routes import gateway_of
from gateway.responses import sse_event
from gateway.service import Gateway
from producer.calls import ChatResult, check_request_id
from producer.contract.cancel import CancelOutcome
from producer.contract.results import Chunk
from producer.errors import ProtocolError


def _callback_url(value: object) -> str:
    if not isinstance(value, str):
        raise GatewayError(Code.INVALID_REQUEST, "must be a string", param="callback_url")
    return value


async def create_job(request: Request) -> Response:
    gw = gateway_of(request)
    caller = await gw.caller(request.headers.get("authorization"))
    body = await read_json(request, gw.settings.max_body_bytes)
    chat = parse_chat_body(
        body,
        default_max_tokens=gw.settings.default_max_tokens,
        extra_fields={"callback_url": _callback_url},
    )
    if chat.stream:
        raise GatewayError(
            Code.INVALID_REQUEST,
            "a job is not streamed in its response: follow GET /v1/jobs/{id}/events",
            param="stream",
        )
    deadline_s = chat.options.get("deadline_s")
    ttl_s = gw.settings.job_result_ttl_s
    # The worker frees the tenant's slot when it writes the final; the lease only bounds a
    # slot whose final never comes (the request dead-lettered).
    lease_s = float(deadline_s) if isinstance(deadline_s, int | float) else float(ttl_s)
    queued = await gw.queue(
        caller,
        chat,
        stream=True,
        idempotency_key=request.headers.get("idempotency-key"),
        lease_s=lease_s,
        result_ttl_s=ttl_s,
    )
    record = await gw.jobs.create(queued.request_id, caller.tenant, chat.model, queued.cancel_token)
    state = await gw.jobs.state(record)
    return json_response(state.to_json(), 202, {"location": f"/v1/jobs/{queued.request_id}"})


async def _owned(request: Request, gw: Gateway, job_id: str) -> JobRecord:
    caller = await gw.caller(request.headers.get("authorization"))
    try:
        check_request_id(job_id)
    except ProtocolError as err:
        raise GatewayError(Code.NOT_FOUND, f"no job {job_id!r}", param="id") from err
    return await gw.jobs.owned(job_id, caller.tenant)


async def get_job(request: Request) -> Response:
    gw = gateway_of(request)
    job_id = request.path_params["job_id"]
    record = await _owned(request, gw, job_id)
    return json_response((await gw.jobs.state(record)).to_json())


async def cancel_job(request: Request) -> Response:
    gw = gateway_of(request)
    job_id = request.path_params["job_id"]
    record = await _owned(request, gw, job_id)
    outcome = await gw.cancel(job_id, record.cancel_token)
    if outcome is CancelOutcome.UNKNOWN:  # the job record outlived everything in the queue
        raise GatewayError(Code.NOT_FOUND, f"no job {job_id!r}", param="id")
    state = await gw.jobs.state(record)
    return json_response({**state.to_json(), "cancelled": bool(outcome)})


async def job_events(request: Request) -> Response:
    gw = gateway_of(request)
    job_id = request.path_params["job_id"]
    record = await _owned(request, gw, job_id)
    last = request.headers.get("last-event-id")
    if last is not None and not last.strip().isdigit():
        raise GatewayError(
            Code.INVALID_REQUEST, "must be an event id (a number)", param="Last-Event-ID"
        )
    from_index = 0 if last is None else int(last) + 1
    return SSEResponse(_events(gw, record, from_index))


async def _events(gw: Gateway, record: JobRecord, from_index: int) -> AsyncIterator[bytes]:
    index = from_index
    try:
        async for item in gw.stream_chunks(record.request_id, from_index):
            if isinstance(item, ChatResult):
                state = JobState(record, "done", result=item)
                yield sse_event("done", state.to_json(), str(index))
                return
            # One event per chunk, its id the chunk's index (what Last-Event-ID resumes
            # from), whatever the chunk holds: text, reasoning, tool calls, any answer's.
            yield sse_event("chunk", _chunk_event(item), str(item.index))
            index = item.index + 1
    except GatewayError as err:
        state = await gw.jobs.state(record)
        if state.status in ("error", "cancelled"):
            yield sse_event("error", state.to_json(), str(index))
        else:
            yield sse_event("error", err.body(), None)


def _chunk_event(chunk: Chunk) -> dict[str, Any]:
    event: dict[str, Any] = {"index": chunk.index, "choice": chunk.choice, "delta": chunk.delta}
    if chunk.reasoning:
        event["reasoning_content"] = chunk.reasoning
    if chunk.tool_calls:
        event["tool_calls"] = [call.to_wire() for call in chunk.tool_calls]
    return event


ROUTES = [
    Route("/v1/jobs", create_job, methods=["POST"]),
    Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/v1/jobs/{job_id}", cancel_job, methods=["DELETE"]),
    Route("/v1/jobs/{job_id}/events", job_events, methods=["GET"]),
]
