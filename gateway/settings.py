"""Typed settings of the gateway and of the webhooks worker, from ``CHATQ_*`` or the CLI.

Every field is one CLI option (``--job-result-ttl-s``) and one environment variable
(``CHATQ_JOB_RESULT_TTL_S``); the CLI wins over the environment, which wins over the
defaults. ``chatq gateway`` hands its settings to uvicorn's worker processes through the
environment (:meth:`GatewaySettings.to_env`), so every process reads the same values.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar
from urllib.parse import urlsplit

from gateway.errors import ConfigError
from producer.connection import CLUSTER_SCHEME, check_url
from producer.contract.limits import DEFAULT_LIMITS
from producer.errors import ChatqError
from producer.settings import DEFAULT_REDIS_URL

S = TypeVar("S", bound="_Settings")  # not typing.Self: that is Python 3.11+, we support 3.10


def _opt(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class CallbackPolicy:
    """Which callback URLs may be called (shared by the gateway's check at submit and the
    webhooks worker's check before each delivery)."""

    allow_hosts: tuple[str, ...] = ()  # empty: any host; else exact names or ".suffix"
    allow_loopback: bool = False  # local use and tests only
    allow_private: bool = True  # 10/8, 172.16/12, 192.168/16, fc00::/7 (in-cluster callbacks)


class _Settings:
    """What both settings types share: the callback policy of their ``webhook_allow_*``
    fields, and construction from ``CHATQ_*`` variables and parsed arguments."""

    webhook_allow_hosts: str
    webhook_allow_loopback: bool
    webhook_allow_private: bool

    @property
    def callback_policy(self) -> CallbackPolicy:
        return CallbackPolicy(
            _hosts(self.webhook_allow_hosts),
            self.webhook_allow_loopback,
            self.webhook_allow_private,
        )

    @classmethod
    def from_env(cls: type[S], environ: Mapping[str, str] | None = None, **overrides: Any) -> S:
        return _from_env(cls, environ, overrides)

    @classmethod
    def from_args(cls: type[S], args: argparse.Namespace) -> S:
        return _from_env(cls, None, _given(cls, args))


@dataclass(frozen=True)
class GatewaySettings(_Settings):
    """What one gateway process needs; validated on construction."""

    redis_url: str = _opt(DEFAULT_REDIS_URL, "Redis URL")
    prefix: str = _opt("chatq", "Redis key prefix")
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8000, "port to listen on")
    workers: int = _opt(1, "gateway processes (uvicorn workers) sharing the port")
    allow_anonymous: bool = _opt(False, "serve requests without an API key (demo, local use)")
    job_result_ttl_s: int = _opt(86_400, "how long job results are kept (seconds)")
    request_timeout_s: float = _opt(600.0, "longest wait for a chat completion's answer")
    stream_idle_timeout_s: float = _opt(120.0, "longest silence while streaming an answer")
    default_max_tokens: int = _opt(256, "max_tokens when a request gives none")
    max_body_bytes: int = _opt(2 << 20, "largest request body accepted")
    models_refresh_s: float = _opt(1.0, "how often the live workers' models are re-read")
    webhook_allow_hosts: str = _opt("", "comma-separated callback hosts (.suffix matches)")
    webhook_allow_loopback: bool = _opt(False, "allow loopback callback URLs (local, tests)")
    webhook_allow_private: bool = _opt(True, "allow private-network callback addresses")
    log_level: str = _opt("info", "uvicorn log level")
    access_log: bool = _opt(False, "log every request (costs time per request)")

    def __post_init__(self) -> None:
        _check_common(self.redis_url, self.prefix)
        for name in ("port", "workers", "job_result_ttl_s", "default_max_tokens", "max_body_bytes"):
            if getattr(self, name) <= 0:
                raise _bad(name, "must be positive")
        if self.job_result_ttl_s > DEFAULT_LIMITS.max_result_ttl_s:
            raise _bad("job_result_ttl_s", f"must be at most {DEFAULT_LIMITS.max_result_ttl_s}")
        for name in ("request_timeout_s", "stream_idle_timeout_s", "models_refresh_s"):
            if not getattr(self, name) > 0:
                raise _bad(name, "must be a positive number of seconds")

    def to_env(self) -> dict[str, str]:
        """``CHATQ_*`` for every field (what :meth:`from_env` reads back)."""
        return _to_env(self)


@dataclass(frozen=True)
class WebhookSettings(_Settings):
    """What ``chatq webhooks`` (the arq worker that delivers callbacks) needs."""

    redis_url: str = _opt(DEFAULT_REDIS_URL, "Redis URL")
    prefix: str = _opt("chatq", "Redis key prefix")
    webhook_timeout_s: float = _opt(10.0, "one delivery attempt's HTTP timeout")
    webhook_max_age_s: float = _opt(86_400.0, "retry a delivery for this long, then record it")
    webhook_backoff_s: float = _opt(1.0, "first retry delay (doubles each try, with jitter)")
    webhook_max_backoff_s: float = _opt(3_600.0, "longest delay between two tries")
    webhook_concurrency: int = _opt(100, "deliveries in flight at once")
    webhook_allow_hosts: str = _opt("", "comma-separated callback hosts (.suffix matches)")
    webhook_allow_loopback: bool = _opt(False, "allow loopback callback URLs (local, tests)")
    webhook_allow_private: bool = _opt(True, "allow private-network callback addresses")
    burst: bool = _opt(False, "exit once the queue is empty (tests, cron)")

    def __post_init__(self) -> None:
        _check_common(self.redis_url, self.prefix)
        for name in (
            "webhook_timeout_s",
            "webhook_max_age_s",
            "webhook_backoff_s",
            "webhook_max_backoff_s",
        ):
            if not getattr(self, name) > 0:
                raise _bad(name, "must be a positive number of seconds")
        if self.webhook_concurrency <= 0:
            raise _bad("webhook_concurrency", "must be positive")


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """One ``--option`` per field of ``cls`` (defaults None: the environment fills them)."""
    for f in fields(cls):
        flag = "--" + ("redis" if f.name == "redis_url" else f.name.replace("_", "-"))
        env = f"CHATQ_{f.name.upper()}"
        text = f"{f.metadata['help']} (default {f.default}; env {env})"
        if _kind(f) is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", default=None, help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=_kind(f), default=None, help=text)


def _kind(f: Any) -> type:
    return type(f.default) if f.default is not MISSING else str


def _parse(name: str, raw: str, kind: type) -> Any:
    if kind is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise _bad(name, f"CHATQ_{name.upper()}={raw!r} is not a boolean")
    try:
        return kind(raw)
    except ValueError as err:
        raise _bad(name, f"CHATQ_{name.upper()}={raw!r} is not a {kind.__name__}") from err


def _from_env(cls: type[S], environ: Mapping[str, str] | None, overrides: dict[str, Any]) -> S:
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]  # both subclasses are dataclasses
        raw = env.get(f"CHATQ_{f.name.upper()}")
        if raw is not None:
            values[f.name] = _parse(f.name, raw, _kind(f))
    values.update(overrides)
    return cls(**values)


def _given(cls: type[Any], args: argparse.Namespace) -> dict[str, Any]:
    return {
        f.name: getattr(args, f.name)
        for f in fields(cls)
        if getattr(args, f.name, None) is not None
    }


def _to_env(settings: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        out[f"CHATQ_{f.name.upper()}"] = (
            ("1" if value else "0") if isinstance(value, bool) else str(value)
        )
    return out


def _hosts(text: str) -> tuple[str, ...]:
    return tuple(h.strip().lower() for h in text.split(",") if h.strip())


def _check_common(redis_url: str, prefix: str) -> None:
    try:
        check_url(redis_url)
    except ChatqError as exc:
        raise _bad("redis_url", str(exc).removeprefix("redis_url").lstrip(": ")) from None
    if urlsplit(redis_url).scheme == CLUSTER_SCHEME:
        # arq's keys carry no hash tag and a tenant's Lua names keys of several slots
        # (docs/reliability.md, "Redis Cluster"): refused, not half-working.
        raise _bad("redis_url", "the gateway and chatq webhooks need one Redis, not a cluster")
    if not prefix or ":" in prefix:
        raise _bad("prefix", f"must be non-empty and contain no ':': {prefix!r}")


def _bad(name: str, message: str) -> ConfigError:
    return ConfigError(name, message)
