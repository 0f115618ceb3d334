"""The gateway's ASGI app: routes, error answers, health, readiness and metrics.

``create_app()`` (uvicorn's factory) reads :class:`GatewaySettings` from ``CHATQ_*``;
one :class:`~gateway.service.Gateway` lives for the app's lifetime.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import Code, GatewayError, from_chatq
from gateway.http import error_response, json_response
from gateway.job_routes import ROUTES as JOB_ROUTES
from gateway.metrics import render_metrics
from gateway.openai_routes import ROUTES as OPENAI_ROUTES
from gateway.openai_routes import gateway_of
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from producer.errors import ChatqError


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The app for ``settings`` (default: from the environment)."""
    resolved = settings or GatewaySettings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = Gateway(resolved)
        try:
            await gateway.start()
        except BaseException:
            await gateway.aclose()
            raise
        app.state.gateway = gateway
        try:
            yield
        finally:
            await gateway.aclose()

    app = FastAPI(
        title="chatq gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.router.routes.extend(OPENAI_ROUTES)
    app.router.routes.extend(JOB_ROUTES)
    app.router.routes.extend(
        [
            Route("/health", health, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )
    app.add_exception_handler(GatewayError, _gateway_error)  # type: ignore[arg-type]
    app.add_exception_handler(ChatqError, _chatq_error)  # type: ignore[arg-type]
    app.add_exception_handler(RedisError, _redis_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    return app


async def health(request: Request) -> Response:
    """The process is up (no Redis involved); which process answered."""
    return json_response({"status": "ok", "pid": os.getpid()})


async def ready(request: Request) -> Response:
    """Redis answers: this process can take requests."""
    gw = gateway_of(request)
    try:
        await gw.redis.ping()
    except (RedisError, OSError) as err:
        return error_response(
            GatewayError(Code.REDIS_UNAVAILABLE, f"Redis unavailable: {err}", retry_after_s=1.0)
        )
    return json_response({"status": "ready"})


async def metrics(request: Request) -> Response:
    """Prometheus text: per-tenant counters (shared by every gateway, kept in Redis)."""
    text = await render_metrics(gateway_of(request))
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def _gateway_error(request: Request, err: GatewayError) -> Response:
    return error_response(err)


async def _chatq_error(request: Request, err: ChatqError) -> Response:
    return error_response(from_chatq(err))


async def _redis_error(request: Request, err: RedisError) -> Response:
    return error_response(GatewayError(Code.REDIS_UNAVAILABLE, f"Redis: {err}", retry_after_s=1.0))


async def _http_error(request: Request, err: HTTPException) -> Response:
    code = Code.NOT_FOUND if err.status_code == 404 else Code.INVALID_REQUEST
    body = GatewayError(code, str(err.detail)).body()
    return json_response(body, err.status_code)
