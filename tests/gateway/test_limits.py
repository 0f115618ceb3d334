"""Tenant limits hold across gateway processes (counted in Redis, exactly), and the key
commands work end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable

import httpx
import pytest

from tests.gateway.conftest import MODEL, REPO, GatewayProcess, create_key, wait_until
from tests.workers.conftest import ThreadWorker

pytestmark = pytest.mark.timeout(240)

# Cost of one request: 2 chars // 4 + 8 per message + max_tokens = 18 tokens.
CHAT = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
COST = 18


@pytest.fixture(scope="module")
def two_gateways(
    gw_worker: ThreadWorker, spawn_gateway: Callable[..., GatewayProcess], module_redis: str
) -> tuple[GatewayProcess, GatewayProcess]:
    create_key(module_redis, "bootstrap")  # a key exists: no --allow-anonymous needed
    return spawn_gateway(), spawn_gateway()


def _post_jobs(gateways: tuple[GatewayProcess, ...], key: str, n: int) -> list[httpx.Response]:
    """n job submissions alternating between the gateways (jobs return at once)."""
    headers = {"authorization": f"Bearer {key}"}
    with httpx.Client(timeout=30) as http:
        return [
            http.post(gateways[i % len(gateways)].url + "/v1/jobs", json=CHAT, headers=headers)
            for i in range(n)
        ]


def _counters(gateway: GatewayProcess, tenant: str) -> dict[str, float]:
    text = httpx.get(gateway.url + "/metrics").text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("chatq_gateway_tenant_") and f'tenant="{tenant}"' in line:
            name = line.split("{")[0].removeprefix("chatq_gateway_tenant_").removesuffix("_total")
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


def test_rpm_exact_across_processes(
    two_gateways: tuple[GatewayProcess, GatewayProcess], module_redis: str
) -> None:
    tenant = f"rpm-{uuid.uuid4().hex[:6]}"
    key = create_key(module_redis, tenant, rpm=6)  # refills one request per 10 s
    responses = _post_jobs(two_gateways, key, 10)
    assert [r.status_code for r in responses] == [202] * 6 + [429] * 4
    limited = responses[-1]
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["retry-after"]) <= 10
    counters = _counters(two_gateways[1], tenant)
    assert counters["requests"] == 6 and counters["refused_rpm"] == 4
    assert counters["cost_tokens"] == 6 * COST


def test_tpm_exact_across_processes(
    two_gateways: tuple[GatewayProcess, GatewayProcess], module_redis: str
) -> None:
    tenant = f"tpm-{uuid.uuid4().hex[:6]}"
    key = create_key(module_redis, tenant, tpm=4 * COST)  # four requests' worth a minute
    responses = _post_jobs(two_gateways, key, 8)
    assert [r.status_code for r in responses] == [202] * 4 + [429] * 4
    assert responses[-1].json()["error"]["code"] == "tokens_rate_limit_exceeded"
    counters = _counters(two_gateways[0], tenant)
    assert counters["requests"] == 4 and counters["refused_tpm"] == 4
    # A request that could never fit the tpm limit is a 400 naming max_tokens.
    too_big = httpx.post(
        two_gateways[0].url + "/v1/chat/completions",
        json={**CHAT, "max_tokens": 500},
        headers={"authorization": f"Bearer {key}"},
    )
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "max_tokens"


def test_concurrency_limit_and_release(
    two_gateways: tuple[GatewayProcess, GatewayProcess], module_redis: str
) -> None:
    tenant = f"conc-{uuid.uuid4().hex[:6]}"
    key = create_key(module_redis, tenant, max_concurrent=2)
    headers = {"authorization": f"Bearer {key}"}
    long = {**CHAT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        streams = [
            http.stream("POST", gw.url + "/v1/chat/completions", json=long, headers=headers)
            for gw in two_gateways
        ]
        opened = [s.__enter__() for s in streams]
        assert [r.status_code for r in opened] == [200, 200]
        third = http.post(two_gateways[0].url + "/v1/chat/completions", json=CHAT, headers=headers)
        assert third.status_code == 429
        assert third.json()["error"]["code"] == "concurrency_limit_exceeded"
        streams[0].__exit__(None, None, None)  # one leaves: its request is cancelled, freed
        ok = wait_until(
            lambda: (
                http.post(
                    two_gateways[1].url + "/v1/chat/completions", json=CHAT, headers=headers
                ).status_code
                == 200
            ),
            timeout_s=30,
            interval_s=0.2,
        )
        assert ok
        streams[1].__exit__(None, None, None)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keys_commands_and_revoke(
    two_gateways: tuple[GatewayProcess, GatewayProcess], module_redis: str
) -> None:
    tenant = f"keys-{uuid.uuid4().hex[:6]}"
    created = _cli("keys", "--redis", module_redis, "create", "--tenant", tenant, "--rpm", "100")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("cq-") and "rpm 100" in created.stderr
    listed = json.loads(_cli("keys", "--redis", module_redis, "list", "--json").stdout)
    mine = [k for k in listed if k["tenant"] == tenant]
    assert len(mine) == 1 and mine[0]["rpm"] == 100 and key not in json.dumps(listed)
    url = two_gateways[0].url + "/v1/chat/completions"
    auth = {"authorization": f"Bearer {key}"}
    assert httpx.post(url, json=CHAT, headers=auth, timeout=30).status_code == 200
    assert _cli("keys", "--redis", module_redis, "revoke", mine[0]["key_id"]).returncode == 0
    denied = httpx.post(url, json=CHAT, headers=auth, timeout=30)  # at once, despite caching
    assert denied.status_code == 401
    assert denied.json()["error"]["code"] == "invalid_api_key"
    assert _cli("keys", "--redis", module_redis, "revoke", mine[0]["key_id"]).returncode == 1


def test_gateway_refuses_to_start_without_keys(module_redis: str) -> None:
    out = _cli("gateway", "--redis", module_redis, "--prefix", "nokeys", "--port", "1")
    assert out.returncode == 2
    assert "no API keys" in out.stderr and "--allow-anonymous" in out.stderr
