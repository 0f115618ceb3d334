"""Callback URL policy: scheme, credentials, allow-list, and refused address ranges."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.callbacks import address_refusal, check_callback_url
from gateway.errors import GatewayError
from gateway.settings import CallbackPolicy

DEFAULT = CallbackPolicy()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "file:///etc/passwd",
        "http://user:pw@example.com/",
        "http://169.254.169.254/latest/meta-data",
        "http://[fd00:ec2::254]/",
        "http://metadata.google.internal/",
        "http://127.0.0.1:8080/hook",
        "http://[::1]/",
        "http://localhost/hook",
        "http://0.0.0.0/",
        "http://[::ffff:127.0.0.1]/",
        "http://224.0.0.1/",
        "http://[fe80::1]/",
        "not a url",
        "http://example.com:99999/",
    ],
)
async def test_refused_by_default(url: str) -> None:
    with pytest.raises(GatewayError) as err:
        await check_callback_url(url, DEFAULT)
    assert err.value.param == "callback_url"


async def test_loopback_allowed_explicitly() -> None:
    policy = CallbackPolicy(allow_loopback=True)
    target = await check_callback_url("http://127.0.0.1:8080/hook?x=1", policy)
    assert target.addresses == ("127.0.0.1",) and target.port == 8080
    with pytest.raises(GatewayError):  # metadata stays refused
        await check_callback_url("http://169.254.169.254/", policy)


async def test_allow_list() -> None:
    policy = CallbackPolicy(allow_hosts=("hooks.example.com", ".corp.example"), allow_loopback=True)
    assert address_refusal(ipaddress.ip_address("10.1.2.3"), policy) is None
    with pytest.raises(GatewayError, match="allow-list"):
        await check_callback_url("http://127.0.0.1/", policy)
    assert address_refusal(ipaddress.ip_address("10.1.2.3"), CallbackPolicy(allow_private=False))


def test_public_addresses_pass() -> None:
    for addr in ("93.184.216.34", "2606:2800:220:1::1"):
        assert address_refusal(ipaddress.ip_address(addr), DEFAULT) is None
