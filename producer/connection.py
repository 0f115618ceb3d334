"""Connections to Redis from a URL: a plain server, the master a Redis Sentinel names, or a
Redis Cluster.

URLs: ``redis://``, ``rediss://`` (TLS), ``unix://`` (redis-py's own forms) and
``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]`` — the
Sentinels to ask (port 26379 by default) and the service name they monitor. Through a
Sentinel URL every new connection asks the Sentinels for the current master, so a client
follows a failover: the calls in flight when the master dies fail with ``ConnectionError``
(as they would on any outage) and the next ones reach the promoted replica. The URL's
credentials authenticate to the master; ``?sentinel_username=&sentinel_password=``
authenticate to the Sentinels when they need it.

``redis+cluster://[[user]:password@]host[:port][,host[:port]...]`` names start-up nodes of a
Redis Cluster (port 6379 by default): the client is redis-py's ``RedisCluster``, which
learns the slot map from them and sends each command to the master of its key's slot. Every
chatq script call touches the keys of one partition (one hash tag, one slot:
``producer.contract.keys``), so each runs on one master; a deployment spreads its traffic
over the masters by splitting the queue into partitions (``partitions``).

Commands are packed by hiredis (C) rather than in Python.

redis-py's sync client already packs commands with hiredis when it is installed; its asyncio
client (5.x) packs every argument in Python. chatq's batched calls carry
thousands of arguments (ENQUEUE of a ``submit_many``, FINALIZE of a worker's flush), so
packing was a visible share of a request's CPU. Same bytes on the wire; an argument hiredis
refuses (bool, None...) goes through redis-py's own packer, which raises its usual
``DataError``. Without hiredis the client is redis-py's, unchanged.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.asyncio.sentinel as aiosentinel
import redis.cluster
import redis.sentinel
from redis.crc import key_slot

from producer.errors import ChatqError

try:
    import hiredis

    _pack: Any = hiredis.pack_command
except (ImportError, AttributeError):  # hiredis missing, or too old to pack
    _pack = None

C = TypeVar("C", bound=type)


def hiredis_packing(connection_class: C) -> C:
    """A subclass of a ``redis.asyncio`` connection class that packs with hiredis."""
    if _pack is None or getattr(connection_class, "_chatq_hiredis_packing", False):
        return connection_class

    def pack_command(self: Any, *args: Any) -> list[bytes]:
        first = args[0]
        # as redis-py: a command name with spaces ("CONFIG GET") is several arguments
        if isinstance(first, str):
            if " " in first:
                args = tuple(first.encode().split()) + args[1:]
        elif isinstance(first, bytes) and b" " in first:
            args = tuple(first.split()) + args[1:]
        try:
            return [_pack(args)]
        except TypeError:
            packed: list[bytes] = connection_class.pack_command(self, *args)  # type: ignore[attr-defined]
            return packed

    name = f"Hiredis{connection_class.__name__}"
    attrs = {"pack_command": pack_command, "_chatq_hiredis_packing": True}
    return type(name, (connection_class,), attrs)  # type: ignore[return-value]


PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
CLUSTER_SCHEME = "redis+cluster"
CLUSTER_PORT = 6379
_SENTINEL_QUERY = ("sentinel_username", "sentinel_password")


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL (see the module doc)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        """Parse ``url``; :class:`ChatqError` naming what is wrong."""
        parts, user, password, hosts = _split(url, SENTINEL_SCHEME)
        path = [p for p in parts.path.split("/") if p]
        if not hosts or not 1 <= len(path) <= 2:
            raise ChatqError(
                f"redis_url: {SENTINEL_SCHEME}://[[user]:password@]host[:port][,host[:port]...]"
                f"/service[/db] expected: {url!r}"
            )
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - set(_SENTINEL_QUERY))
        if unknown:
            raise ChatqError(f"redis_url: unsupported Sentinel URL option(s) {unknown}: {url!r}")
        return cls(
            sentinels=tuple(_host_port(h, url) for h in hosts.split(",")),
            service=unquote(path[0]),
            db=_db(path[1] if len(path) == 2 else "0", url),
            username=unquote(user) or None,
            password=unquote(password) or None,
            sentinel_username=query.get("sentinel_username", [None])[-1],
            sentinel_password=query.get("sentinel_password", [None])[-1],
        )

    def sentinel_kwargs(self, client_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Connection options for the Sentinels themselves: the client's socket options
        (timeouts) and the URL's Sentinel credentials."""
        out = {k: v for k, v in client_kwargs.items() if k.startswith("socket_")}
        if self.sentinel_username:
            out["username"] = self.sentinel_username
        if self.sentinel_password:
            out["password"] = self.sentinel_password
        return out

    def master_kwargs(self) -> dict[str, Any]:
        """Connection options for the master (and replicas) the Sentinels name."""
        return {"db": self.db, "username": self.username, "password": self.password}


@dataclass(frozen=True)
class ClusterUrl:
    """A parsed ``redis+cluster://`` URL (see the module doc)."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> ClusterUrl:
        """Parse ``url``; :class:`ChatqError` naming what is wrong."""
        parts, user, password, hosts = _split(url, CLUSTER_SCHEME)
        if not hosts or parts.path.strip("/") or parts.query:
            raise ChatqError(
                f"redis_url: {CLUSTER_SCHEME}://[[user]:password@]host[:port][,host[:port]...]"
                f" expected (no database, no options: a cluster has database 0 only): {url!r}"
            )
        return cls(
            nodes=tuple(_host_port(h, url, CLUSTER_PORT, "Cluster") for h in hosts.split(",")),
            username=unquote(user) or None,
            password=unquote(password) or None,
        )

    def client_kwargs(self) -> dict[str, Any]:
        return {"username": self.username, "password": self.password}


def _split(url: str, scheme: str) -> tuple[SplitResult, str, str, str]:
    """``url`` of ``scheme`` -> (its parts, user, password, comma-separated hosts)."""
    parts = urlsplit(url)
    if parts.scheme != scheme:
        raise ChatqError(f"redis_url: not a {scheme}:// URL: {url!r}")
    credentials, _, hosts = parts.netloc.rpartition("@")
    user, _, password = credentials.partition(":")
    return parts, user, password, hosts


def _host_port(
    text: str, url: str, default_port: int = SENTINEL_PORT, what: str = "Sentinel"
) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":") if ":" in text else (text.strip(), "", "")
    if not host:
        raise ChatqError(f"redis_url: empty {what} host in {url!r}")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ChatqError(f"redis_url: bad {what} port {port!r} in {url!r}")
    return host, int(port)


def _db(text: str, url: str) -> int:
    if not text.isdigit():
        raise ChatqError(f"redis_url: database must be a number, not {text!r}: {url!r}")
    return int(text)


def check_url(url: str) -> None:
    """Raise :class:`ChatqError` (naming ``redis_url``) unless ``url`` is a URL :func:`connect`
    takes."""
    scheme = urlsplit(url).scheme
    if scheme == SENTINEL_SCHEME:
        SentinelUrl.parse(url)
    elif scheme == CLUSTER_SCHEME:
        ClusterUrl.parse(url)
    elif scheme not in PLAIN_SCHEMES or "://" not in url:
        raise ChatqError(
            f"redis_url must be redis://, rediss://, unix://, {SENTINEL_SCHEME}:// or "
            f"{CLUSTER_SCHEME}://: {url!r}"
        )


def connect(url: str, **kwargs: Any) -> aioredis.Redis:
    """An asyncio client for ``url`` (``Redis.from_url`` for a plain URL, the Sentinels'
    master for a Sentinel URL), ``kwargs`` passed on, commands packed by hiredis (TLS, unix
    socket and Sentinel connection classes are subclassed, not replaced); for a Cluster URL a
    ``RedisCluster`` (its type is not ``Redis``'s, but it takes the same calls)."""
    if urlsplit(url).scheme == CLUSTER_SCHEME:
        return _cluster(url, kwargs)  # type: ignore[no-any-return]
    if urlsplit(url).scheme == SENTINEL_SCHEME:
        target = SentinelUrl.parse(url)
        sentinel = aiosentinel.Sentinel(  # type: ignore[no-untyped-call]
            target.sentinels, sentinel_kwargs=target.sentinel_kwargs(kwargs), **kwargs
        )
        client: aioredis.Redis = sentinel.master_for(target.service, **target.master_kwargs())
    else:
        client = aioredis.Redis.from_url(url, **kwargs)
    pool = client.connection_pool
    pool.connection_class = hiredis_packing(pool.connection_class)
    return client


def connect_sync(url: str, **kwargs: Any) -> redis.Redis:
    """The blocking twin of :func:`connect` (redis-py's sync client packs with hiredis
    itself)."""
    if urlsplit(url).scheme == CLUSTER_SCHEME:
        return _cluster_sync(url, kwargs)  # type: ignore[no-any-return]
    if urlsplit(url).scheme != SENTINEL_SCHEME:
        return redis.Redis.from_url(url, **kwargs)
    target = SentinelUrl.parse(url)
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        target.sentinels, sentinel_kwargs=target.sentinel_kwargs(kwargs), **kwargs
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        target.service, **target.master_kwargs()
    )
    return client


def _cluster(url: str, kwargs: dict[str, Any]) -> Any:
    parsed = ClusterUrl.parse(url)
    nodes = [aiocluster.ClusterNode(host, port) for host, port in parsed.nodes]
    return aiocluster.RedisCluster(startup_nodes=nodes, **parsed.client_kwargs(), **kwargs)


def _cluster_sync(url: str, kwargs: dict[str, Any]) -> Any:
    parsed = ClusterUrl.parse(url)
    nodes = [
        redis.cluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]
        for host, port in parsed.nodes
    ]
    return redis.cluster.RedisCluster(startup_nodes=nodes, **parsed.client_kwargs(), **kwargs)


def is_cluster(client: Any) -> bool:
    """True for a Redis Cluster client (:func:`connect` or :func:`connect_sync` of a
    ``redis+cluster://`` URL)."""
    return isinstance(client, aiocluster.RedisCluster | redis.cluster.RedisCluster)


def by_slot(names: Any) -> list[list[Any]]:
    """``names`` (key names) grouped by hash slot, in the order first seen."""
    groups: dict[int, list[Any]] = {}
    for name in names:
        raw = name if isinstance(name, bytes) else str(name).encode()
        groups.setdefault(key_slot(raw), []).append(name)
    return list(groups.values())


async def xread_any(
    client: Any, streams: dict[Any, Any], *, count: int, block: int | None
) -> list[Any]:
    """XREAD over ``streams``, blocking until any has entries. One call on one Redis; on a
    Cluster one per hash slot at once (XREAD of several slots is refused), answered as soon
    as one of them is: the others are cancelled (a plain XREAD moves no cursor, so what
    they would have read comes with the next call)."""
    groups = by_slot(streams) if is_cluster(client) else [list(streams)]
    if len(groups) == 1:
        reply: Any = await client.xread(streams, count=count, block=block)
        return list(reply or [])
    tasks = [
        asyncio.ensure_future(client.xread({k: streams[k] for k in g}, count=count, block=block))
        for g in groups
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    out: list[Any] = []
    for task in done:
        out += task.result() or []
    return out


async def mget_any(client: Any, names: list[Any]) -> list[Any]:
    """MGET of ``names`` in their order: one call on one Redis; on a Cluster one per hash slot
    (MGET of several slots is refused), sent together."""
    groups = by_slot(names) if is_cluster(client) else [names]
    if len(groups) == 1:
        return list(await client.mget(names))
    replies = await asyncio.gather(*(client.mget(group) for group in groups))
    values = {name: value for group, reply in zip(groups, replies, strict=True)
              for name, value in zip(group, reply, strict=True)}  # fmt: skip
    return [values[name] for name in names]


def xread_any_sync(
    client: Any, streams: dict[Any, Any], *, count: int, block: int | None
) -> list[Any]:
    """The blocking twin of :func:`xread_any`: on a Cluster, the slots are read in turn, each
    blocking for its share of ``block``, until one has entries."""
    groups = by_slot(streams) if is_cluster(client) else [list(streams)]
    if len(groups) == 1:
        return list(client.xread(streams, count=count, block=block) or [])
    share = None if block is None else max(1, block // len(groups))
    for group in groups:
        reply = client.xread({k: streams[k] for k in group}, count=count, block=share)
        if reply:
            return list(reply)
    return []
