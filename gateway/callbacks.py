"""Which callback URLs a webhook may be sent to (server-side request forgery guard).

http / https only, no credentials in the URL, the host on the allow-list when one is set,
and every address the host resolves to outside the refused ranges: link-local (which holds
the cloud metadata services), the known metadata addresses, unspecified, multicast and
reserved ranges always; loopback unless explicitly allowed (local use, tests); private
networks unless disallowed. The gateway checks at submit (400 naming ``callback_url``); the
webhooks worker checks again before each delivery and connects only to the addresses it
checked, so a name that later resolves elsewhere (DNS rebinding) gains nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from gateway.errors import Code, GatewayError
from gateway.settings import CallbackPolicy

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
_METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.azure.com"})


@dataclass(frozen=True)
class CallbackTarget:
    """A checked callback URL and the addresses it may be delivered to."""

    url: str
    parts: SplitResult
    host: str
    port: int
    addresses: tuple[str, ...]


def _refuse(message: str) -> GatewayError:
    return GatewayError(Code.INVALID_REQUEST, message, param="callback_url")


def address_refusal(addr: Address, policy: CallbackPolicy) -> str | None:
    """Why ``addr`` may not be called, or None if it may."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr in _METADATA_ADDRESSES:
        return "is a cloud metadata address"
    if addr.is_loopback:
        return None if policy.allow_loopback else "is a loopback address"
    if addr.is_link_local:
        return "is a link-local address"
    if addr.is_unspecified or addr.is_multicast or addr.is_reserved:
        return "is not a routable unicast address"
    if addr.is_private and not policy.allow_private:
        return "is a private-network address"
    return None


def _host_allowed(host: str, allow_hosts: tuple[str, ...]) -> bool:
    if not allow_hosts:
        return True
    return any(
        host == entry or (entry.startswith(".") and host.endswith(entry)) for entry in allow_hosts
    )


def parse_callback_url(url: object, policy: CallbackPolicy) -> tuple[SplitResult, str, int]:
    """The URL's parts, host and port, if its form and host name are allowed."""
    if not isinstance(url, str) or not 0 < len(url) <= 2048:
        raise _refuse("must be a URL of at most 2048 characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise _refuse(f"is not a valid URL ({err})") from err
    if parts.scheme not in ("http", "https"):
        raise _refuse("must be an http:// or https:// URL")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise _refuse("has no host")
    if parts.username is not None or parts.password is not None:
        raise _refuse("must not carry credentials")
    if host in _METADATA_NAMES:
        raise _refuse(f"host {host} is a cloud metadata service")
    if not _host_allowed(host, policy.allow_hosts):
        raise _refuse(f"host {host} is not on the callback allow-list")
    return parts, host, port or (443 if parts.scheme == "https" else 80)


async def check_callback_url(url: object, policy: CallbackPolicy) -> CallbackTarget:
    """Check ``url`` and resolve its host; 400 naming ``callback_url`` if refused."""
    parts, host, port = parse_callback_url(url, policy)
    try:
        literal: Address | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as err:
            raise _refuse(f"host {host} does not resolve ({err})") from err
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    for addr in addresses:
        why = address_refusal(addr, policy)
        if why is not None:
            raise _refuse(f"host {host} resolves to {addr}, which {why}")
    assert isinstance(url, str)
    unique = tuple(dict.fromkeys(str(a) for a in addresses))
    return CallbackTarget(url, parts, host, port, unique)
