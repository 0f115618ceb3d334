"""Typed settings: environment constructor and validation."""

from __future__ import annotations

import pytest

from producer.contract.keys import Keys
from producer.errors import ChatqError
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
    assert k.requests("smollm2", "high") == "chatq:req:{q0}:smollm2:high"
    assert k.request_lanes("m") == [
        "chatq:req:{q0}:m:high", "chatq:req:{q0}:m:normal", "chatq:req:{q0}:m:low"
    ]  # fmt: skip
    assert k.result("abc") == "chatq:res:{q0}:abc"
    assert k.heartbeat("w1") == "chatq:hb:{q0}:w1"
    assert (k.dead(), k.cancel()) == ("chatq:dead:{q0}", "chatq:cancel:{q0}")
    assert k.idempotency("key") == "chatq:idem:{q0}:key"
    assert k.backlog("m") == "chatq:backlog:{q0}:m"


def test_partitioned_keys_carry_the_partition_of_their_id() -> None:
    k = Keys("chatq", partitions=3)
    ids = [f"r{i}" for i in range(60)]
    seen = {k.partition_of(i) for i in ids}
    assert seen == {0, 1, 2}  # ids spread over every partition
    for rid in ids:
        p = k.partition_of(rid)
        for name in (k.result(rid), k.final(rid), k.reservation(rid), k.cancelled(rid)):
            assert name.endswith(f":{{q{p}}}:{rid}") and Keys.partition_in(name) == p
    assert k.requests("m", "low", 2) == "chatq:req:{q2}:m:low"
    assert Keys.partition_in(k.backlog("m", 1)) == 1
    with pytest.raises(ChatqError, match="partitions"):
        Keys("chatq", partitions=0)
