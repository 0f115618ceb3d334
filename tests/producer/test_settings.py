"""Typed settings: environment constructor and validation."""

from __future__ import annotations

import pytest

from producer.errors import ChatqError
from producer.keys import Keys
from producer.settings import DEFAULT_REDIS_URL, ClientSettings


def test_from_env_reads_variables() -> None:
    s = ClientSettings.from_env(
        {
            "CHATQ_REDIS_URL": "redis://127.0.0.1:6380/2",
            "CHATQ_PREFIX": "cq",
            "CHATQ_MAX_BACKLOG_TOKENS": "5000",
        }
    )
    assert (s.redis_url, s.prefix, s.max_backlog_tokens) == ("redis://127.0.0.1:6380/2", "cq", 5000)
    assert ClientSettings.from_env({}).redis_url == DEFAULT_REDIS_URL


@pytest.mark.parametrize(
    "env",
    [
        {"CHATQ_REDIS_URL": "http://localhost"},
        {"CHATQ_PREFIX": "a:b"},
        {"CHATQ_MAX_BACKLOG_TOKENS": "lots"},
        {"CHATQ_MAX_BACKLOG_TOKENS": "0"},
    ],
)
def test_bad_settings_raise_root_error(env: dict[str, str]) -> None:
    with pytest.raises(ChatqError):
        ClientSettings.from_env(env)


def test_key_layout_matches_design() -> None:
    k = Keys("chatq")
    assert k.requests("smollm2", "high") == "chatq:req:smollm2:high"
    assert k.request_lanes("m") == ["chatq:req:m:high", "chatq:req:m:normal", "chatq:req:m:low"]
    assert k.result("abc") == "chatq:res:abc"
    assert k.heartbeat("w1") == "chatq:hb:w1"
    assert (k.dead, k.cancel) == ("chatq:dead", "chatq:cancel")
    assert k.idempotency("key") == "chatq:idem:key"
    assert k.backlog("m") == "chatq:backlog:m"
