"""TLS and ACL for real: ``deploy/redis`` (start.sh, redis.conf, the ACL template) run as a
real ``redis-server`` with TLS only and client certificates; the client, a worker and the
operator views run under their own users over ``rediss://``, and each role is refused what
it does not need."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import msgpack
import pytest
import redis
import redis.asyncio

from producer import (
    CancelOutcome,
    ChatClient,
    ClientSettings,
    ProtocolError,
    QueueFull,
    RequestFailed,
)
from producer.connection import connect
from producer.contract.codec import encode_envelope, make_envelope
from producer.contract.keys import Keys
from tests.deploy.certs import Certs, make_certs
from tests.workers.conftest import MODEL, ThreadWorker, tiny_settings
from workers.exporter import QueueExporter
from workers.redis_server import free_port
from workers.status import status_report
from workers.top import Top

REPO = Path(__file__).resolve().parents[2]
PASSWORDS = {
    "producer": "p-secret",
    "gateway": "g-secret",
    "webhooks": "h-secret",
    "worker": "w-secret",
    "operator": "o-secret",
}
KEYS = Keys()

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("openssl") is None,
    reason="needs redis-server (with TLS) and openssl",
)


@dataclass(frozen=True)
class TlsRedis:
    port: int
    certs: Certs

    def url(self, user: str, *, cert: str = "client", db: int = 0) -> str:
        query = {"ssl_ca_certs": str(self.certs.ca)}
        if cert == "client":
            query |= {"ssl_certfile": str(self.certs.client_cert),
                      "ssl_keyfile": str(self.certs.client_key)}  # fmt: skip
        elif cert == "rogue":
            query |= {"ssl_certfile": str(self.certs.rogue_cert),
                      "ssl_keyfile": str(self.certs.rogue_key)}  # fmt: skip
        auth = f"{user}:{PASSWORDS[user]}@" if user in PASSWORDS else ""
        return f"rediss://{auth}localhost:{self.port}/{db}?{urlencode(query)}"

    def sync(self, user: str, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(user, db=db))


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    d = tmp_path_factory.mktemp("tls")
    certs = make_certs(d)
    port = free_port()
    env = {**os.environ, "CHATQ_REDIS_ACL_FILE": str(d / "users.acl")}
    env |= {f"CHATQ_REDIS_{role.upper()}_PASSWORD": pw for role, pw in PASSWORDS.items()}
    log = (d / "redis.log").open("wb")
    proc = subprocess.Popen(
        ["sh", str(REPO / "deploy/redis/start.sh"), "--port", "0", "--tls-port", str(port),
         "--bind", "127.0.0.1", "--dir", str(d), "--appendonly", "no", "--save", "",
         "--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key),
         "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "yes"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = TlsRedis(port, certs)
    try:
        _wait_for(lambda: _pings(server), 15, proc, d / "redis.log")
        yield server
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _pings(server: TlsRedis) -> bool:
    try:
        with server.sync("operator") as r:
            return bool(r.ping())
    except (redis.ConnectionError, OSError):
        return False


def _wait_for(cond: Callable[[], bool], timeout_s: float, proc: subprocess.Popen[bytes],
              log: Path) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"redis-server with TLS did not start:\n{log.read_text()}")
        time.sleep(0.1)


USER = [{"role": "user", "content": "Where is my parcel?"}]


async def _produce(url: str) -> None:
    async with ChatClient(url) as client:
        rid = await client.submit(USER, model=MODEL, max_tokens=4, stream=True,
                                  idempotency_key="ticket-1")  # fmt: skip
        assert await client.submit(USER, model=MODEL, max_tokens=4,
                                   idempotency_key="ticket-1") == rid  # fmt: skip
        streamed = "".join([d async for d in client.stream(rid, timeout_s=60)])
        result = await client.result(rid, timeout_s=60)
        assert result.text == streamed and result.usage.completion_tokens == 4
        ids = await client.submit_many([USER, USER, USER], model=MODEL, max_tokens=3)
        assert len(await client.results_many(ids, timeout_s=60)) == 3
        long_id = await client.submit(USER, model=MODEL, max_tokens=500, ignore_eos=True,
                                      stream=True)  # fmt: skip
        await client.stream(long_id, timeout_s=60).__anext__()  # running
        await client.cancel(long_id)
        with pytest.raises(RequestFailed) as err:
            await client.result(long_id, timeout_s=60)
        assert err.value.code == "cancelled"


async def _operate(url: str) -> None:
    r = connect(url)
    try:
        report = await status_report(r, KEYS)
        assert [m.model for m in report] == [MODEL] and report[0].dead_letters == 1
        assert [w.name for w in report[0].workers] == ["tls-w"]
        top = Top(r, KEYS)
        await top.frame()
        assert (await top.frame()).report[0].model == MODEL
        exporter = QueueExporter(url)
        await exporter.poll(r)
        assert exporter.redis_up
    finally:
        await r.aclose()


def test_client_worker_and_operator_run_under_their_users_over_tls(
    tls_redis: TlsRedis, tiny_checkpoint: Callable[..., Path]
) -> None:
    settings = tiny_settings(tls_redis.url("worker"), tiny_checkpoint("llama"), name="tls-w")
    worker = ThreadWorker(settings).start()
    try:
        asyncio.run(_produce(tls_redis.url("producer")))
        # An unreadable entry (a producer may add anything to a lane): dead-lettered.
        with tls_redis.sync("producer") as r:
            r.xadd(KEYS.requests(MODEL, "normal"), {"m": msgpack.packb([1, 2])})
        with tls_redis.sync("operator") as r:
            _until(lambda: r.xlen(KEYS.dead()) == 1, 30, "the dead letter")
        asyncio.run(_operate(tls_redis.url("operator")))
    finally:
        worker.stop()
    assert worker.exit_code == 0 and worker.error is None


def _until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _refused(r: redis.Redis, *command: str) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):
        r.execute_command(*command)


def test_each_role_is_refused_what_it_does_not_need(tls_redis: TlsRedis) -> None:
    """(Database 1: the other test's keys in database 0 stay out of the way; nobody may
    FLUSHALL to clean up.)"""
    res = KEYS.result("r1")
    lane = KEYS.requests(MODEL, "normal")
    with tls_redis.sync("producer", 1) as p:
        p.xadd(lane, {"m": b"x"})  # allowed: enqueue
        _refused(p, "XADD", res, "*", "t", "done")  # results are written by workers only
        _refused(p, "XRANGE", lane, "-", "+")  # lanes are write-only: queued ids stay unread
        _refused(p, "XLEN", lane)
        _refused(p, "SCAN", "0")  # no listing of result streams (or anything)
        assert p.setnx(KEYS.reservation("r1"), "1-1 ")  # ids are reserved create-only...
        _refused(p, "SET", KEYS.reservation("r1"), "2-2 ")  # ...never re-pointed
        _refused(p, "EXPIRE", KEYS.reservation("r1"), "1")  # ...nor expired
        _refused(p, "DEL", KEYS.reservation("r1"))
        _refused(p, "HSET", KEYS.bounds(), "backlog_tokens", "999999999")  # bounds: operators'
        _refused(p, "XREAD", "STREAMS", KEYS.cancel(), "0")  # cancels are write-only
        _refused(p, "GET", KEYS.cancelled("r1"))
        _refused(p, "XREADGROUP", "GROUP", "workers", "c", "STREAMS", lane, ">")
        _refused(p, "SET", KEYS.final("r1"), "1")
        _refused(p, "SET", "other:key", "1")
        _refused(p, "FLUSHALL")
        _refused(p, "CONFIG", "GET", "*")
        _refused(p, "KEYS", "*")
    with tls_redis.sync("worker", 1) as w:
        w.xadd(res, {"t": "done"})  # allowed: answer
        _refused(w, "XADD", KEYS.cancel(), "*", "id", "r1")  # cancels come from producers
        _refused(w, "SET", "other:key", "1")
        _refused(w, "FLUSHALL")
        _refused(w, "ACL", "LIST")
    with tls_redis.sync("operator", 1) as o:
        assert o.xlen(lane) == 1  # allowed: read
        o.hset(KEYS.bounds(), "total_tokens", "5000000")  # allowed: the queue's bounds
        _refused(o, "SET", "chatq:x", "1")
        _refused(o, "DEL", lane)
        _refused(o, "XADD", lane, "*", "m", "x")
        _refused(o, "SHUTDOWN")


def test_no_certificate_foreign_certificate_no_user_and_plain_tcp_are_refused(
    tls_redis: TlsRedis,
) -> None:
    for cert in ("none", "rogue"):
        with (
            redis.Redis.from_url(tls_redis.url("producer", cert=cert)) as r,
            pytest.raises((redis.ConnectionError, ssl.SSLError, OSError)),
        ):
            r.ping()
    with (
        redis.Redis.from_url(tls_redis.url("nobody")) as r,
        pytest.raises(redis.exceptions.AuthenticationError),
    ):
        r.ping()  # the default user is off
    bad = tls_redis.url("producer").replace(PASSWORDS["producer"], "wrong")
    with redis.Redis.from_url(bad) as r, pytest.raises(redis.exceptions.AuthenticationError):
        r.ping()
    plain = f"redis://producer:{PASSWORDS['producer']}@127.0.0.1:{tls_redis.port}/0"
    with (
        redis.Redis.from_url(plain, socket_timeout=3) as r,
        pytest.raises((redis.ConnectionError, redis.TimeoutError)),
    ):
        r.ping()


async def _attacks(tls: TlsRedis) -> None:
    """Issue #17's attacks, each by a second producer against a victim's request, with the
    ACL users over TLS (database 2: the other tests' keys stay out of the way)."""
    victim, attacker = ChatClient(tls.url("producer", db=2)), ChatClient(tls.url("producer", db=2))
    raw = redis.asyncio.Redis.from_url(tls.url("producer", db=2))
    try:
        chat = [{"role": "user", "content": "Where is my order?"}]
        baseline = await victim.chat(chat, model=MODEL, max_tokens=4, timeout_s=60)
        long = {"model": MODEL, "max_tokens": 1500, "ignore_eos": True, "stream": True}
        blockers = [await victim.submit(USER, **long) for _ in range(4)]
        for b in blockers:  # the worker's 4 slots are held: the victim's request waits
            await victim.stream(b, timeout_s=60).__anext__()
        rid = await victim.submit(chat, model=MODEL, max_tokens=4)

        # Forged answers: result streams are written by workers only.
        with pytest.raises(redis.exceptions.NoPermissionError):
            await raw.xadd(KEYS.result(rid), {"t": "done", "m": b"FORGED ANSWER"})
        # Hijack: queued ids can not be read or listed; an id learned anyway can not be
        # queued again, nor its reservation re-pointed; a copy added by hand is parked.
        for command in (("XRANGE", KEYS.requests(MODEL, "normal"), "-", "+"), ("SCAN", "0")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                await raw.execute_command(*command)
        with pytest.raises(ProtocolError) as refused:
            await attacker.submit(chat, model=MODEL, priority="high", request_id=str(rid))
        assert refused.value.code == "id_in_use"
        forged = make_envelope([{"role": "user", "content": "FORGED ANSWER " * 30}],
                               model=MODEL, request_id=str(rid), max_tokens=4)  # fmt: skip
        await raw.xadd(KEYS.requests(MODEL, "high"), {"m": encode_envelope(forged)})
        assert not await raw.setnx(KEYS.reservation(rid), "1-1 ")
        # Cancel: needs the token; one written by hand is ignored by the worker.
        with pytest.raises(ProtocolError) as refused:
            await attacker.cancel(str(rid), "guess")
        assert refused.value.code == "not_owner"
        assert await attacker.cancel("never-queued", "guess") is CancelOutcome.UNKNOWN
        await raw.set(KEYS.cancelled(rid), "guess")
        await raw.xadd(KEYS.cancel(), {"id": str(rid), "token": "guess"})
        for b in blockers:
            await victim.cancel(b)  # False if one has finished already
        result = await victim.result(rid, timeout_s=60)
        assert result.usage.prompt_tokens == baseline.usage.prompt_tokens  # its own answer

        # Idempotency keys: per model and tenant, and one key names one body.
        a = await victim.submit(chat, model=MODEL, tenant="a", idempotency_key="order-1")
        b = await attacker.submit(chat, model="other", tenant="b", idempotency_key="order-1")
        assert a != b
        with pytest.raises(ProtocolError) as refused:
            await attacker.submit(USER, model=MODEL, tenant="a", idempotency_key="order-1")
        assert refused.value.code == "idempotency_mismatch"

        # Bounds: set by the operator; a client asking for more gets no more.
        with pytest.raises(redis.exceptions.NoPermissionError):
            await raw.hset(KEYS.bounds(), "max_models", 10**6)
        # Two models no worker serves keep requests queued ("other" above and one more), so
        # the bound is reached whatever the worker has finished of MODEL's by now.
        await attacker.submit(USER, model="other-2", tenant="b", max_tokens=4)
        with redis.Redis.from_url(tls.url("operator", db=2)) as operator:
            operator.hset(KEYS.bounds(), "max_models", 2)
        greedy = ChatClient(
            settings=ClientSettings(tls.url("producer", db=2), max_backlog_tokens=10**12)
        )
        try:
            with pytest.raises(QueueFull):
                await greedy.submit(chat, model="made-up", max_tokens=4)
        finally:
            await greedy.aclose()
    finally:
        await victim.aclose()
        await attacker.aclose()
        await raw.aclose()


def test_attacks_by_another_producer_do_no_harm(
    tls_redis: TlsRedis, tiny_checkpoint: Callable[..., Path]
) -> None:
    settings = tiny_settings(tls_redis.url("worker", db=2), tiny_checkpoint("llama"), name="tls-a")
    worker = ThreadWorker(settings).start()
    try:
        asyncio.run(_attacks(tls_redis))
        with tls_redis.sync("operator", 2) as r:
            dead = r.xrange(KEYS.dead())
            assert [f[b"reason"] for _, f in dead] == [
                b"not the entry its request id was reserved for"
            ]
    finally:
        worker.stop()
    assert worker.exit_code == 0 and worker.error is None
