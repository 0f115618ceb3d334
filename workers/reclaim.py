"""Heartbeats, reclaiming a dead worker's pending entries, and dead letters.

Every worker beats ``chatq:hb:{q<p>}:<name>`` in every partition (TTL ``HEARTBEAT_TTL_S``);
its consumer name in group ``workers`` is the same ``<name>``. A consumer whose heartbeat
key is gone is dead: the live
workers' :meth:`Reclaimer.reclaim` moves its pending entries to themselves at once, with no
idle wait, through one Lua call per consumer that re-checks the heartbeat, so a live (even
very slow) worker never loses an entry, and two reclaimers never both get one entry. An entry
delivered more than ``max_deliveries`` times (it keeps killing workers) is not handed out
again: it goes to the dead-letter stream of its partition and its requester gets a
``dead_letter`` error, in one atomic step with the acknowledgement (FINALIZE's body). Dead
consumers are deleted once their pending list is empty.

A missing heartbeat means death only if its owner could have beaten: after a Redis outage
or a ``CLIENT PAUSE`` longer than the TTL every heartbeat has expired, live workers' too. So
a reclaimer claims only once it has itself seen Redis healthy for longer than the heartbeat
TTL (:meth:`Reclaimer.healthy_for_s`: its own beats landing promptly and on time, with no
gap — a failed beat, a slow one, or its own process stalled, as a long GC pause or SIGSTOP
would — starts the count again), by when every live worker has beaten again; and only from
a read of the heartbeats that Redis answered promptly (a pause that catches the reclaim
rather than a beat breaks the count as well). A Redis restarted from older data (a snapshot,
a lagging replica) may have lost every heartbeat without any beat failing: RECLAIM checks the
claimer's own heartbeat too, and its absence starts the count again.

The worker calls these plain async methods from its one loop; nothing here runs its own loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from producer.contract.codec import decode_envelope
from producer.contract.codes import ErrorCode
from producer.contract.envelope import Envelope
from producer.contract.finalize import (
    charged_cost,
    dead_letter_call,
    dead_letter_fields,
    dead_letter_raw_call,
)
from producer.contract.keys import (
    GROUP,
    HEARTBEAT_TTL_S,
    PRIORITIES,
    RESULT_TTL_S,
    STREAM_FIELD,
    Keys,
)
from producer.contract.limits import DEFAULT_LIMITS, Limits
from producer.contract.results import Error, result_body
from producer.contract.scripts import BEAT, DEAD_LETTER, DEAD_LETTER_RAW, RECLAIM
from producer.errors import ProtocolError
from workers.errors import WorkerError

STREAM_FIELD_BYTES = STREAM_FIELD.encode()


@dataclass(frozen=True)
class ClaimedEntry:
    """A request-stream entry now pending on this worker, for intake to process."""

    stream: str
    entry_id: str
    fields: dict[bytes, bytes]
    delivery_count: int  # including the delivery this claim made

    @property
    def priority(self) -> str:
        lane = self.stream.rsplit(":", 1)[-1]
        return lane if lane in PRIORITIES else "normal"


@dataclass(frozen=True)
class ReclaimEvent:
    """One dead consumer's entries moved off one lane.

    ``last_beat_ms`` is the last heartbeat this reclaimer saw from it (None if it never saw
    one); the worker died after that beat, so ``since_last_beat_ms`` bounds death→claimed
    from above, and ``since_expiry_ms`` (claimed minus heartbeat expiry) is how long the
    reclaim took to notice.
    """

    dead_worker: str
    stream: str
    claimed: int
    dead_lettered: int
    consumer_removed: bool
    claimed_ms: int  # Unix ms
    last_beat_ms: int | None
    heartbeat_ttl_ms: int | None

    @property
    def since_last_beat_ms(self) -> int | None:
        return None if self.last_beat_ms is None else self.claimed_ms - self.last_beat_ms

    @property
    def since_expiry_ms(self) -> int | None:
        if self.last_beat_ms is None or self.heartbeat_ttl_ms is None:
            return None
        return self.claimed_ms - (self.last_beat_ms + self.heartbeat_ttl_ms)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _b(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _fields(flat: Any) -> dict[bytes, bytes]:
    items = list(flat or [])
    return {_b(items[i]): _b(items[i + 1]) for i in range(0, len(items) - 1, 2)}


async def name_free(redis: Redis, keys: Keys, names: Sequence[str]) -> None:
    """Raise :class:`WorkerError` if a live worker holds any of ``names``, after waiting one
    heartbeat TTL (a crashed predecessor's key expires by then). Run before anything is
    loaded, so a duplicate ``--name`` fails in a second, not after the model loads."""
    deadline = time.monotonic() + HEARTBEAT_TTL_S
    while True:
        held = [n for n, v in zip(names, await redis.mget([keys.heartbeat(n) for n in names]),
                                  strict=True) if v is not None]  # fmt: skip
        if not held:
            return
        if time.monotonic() >= deadline:
            raise WorkerError(
                f"worker name {held[0]!r} is in use by a live worker: pick another --name"
            )
        await asyncio.sleep(0.1)


class Reclaimer:
    """Heartbeat and reclaim for one worker (``worker`` = its consumer name)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        worker: str,
        *,
        max_deliveries: int = 3,
        heartbeat_ttl_s: float = HEARTBEAT_TTL_S,
        safety_idle_s: float = 300.0,
        sweep_interval_s: float = 30.0,
        batch: int = 100,
        result_ttl_s: int = RESULT_TTL_S,
        limits: Limits = DEFAULT_LIMITS,
        events_kept: int = 256,
    ) -> None:
        if max_deliveries < 1 or heartbeat_ttl_s <= 0 or batch < 1:
            raise WorkerError("max_deliveries and batch must be >= 1, heartbeat_ttl_s > 0")
        self.redis = redis
        self.keys = keys
        self.worker = worker
        self.max_deliveries = max_deliveries
        self.heartbeat_ttl_ms = max(1, int(heartbeat_ttl_s * 1000))
        self.safety_idle_ms = int(safety_idle_s * 1000)
        self.sweep_interval_s = sweep_interval_s
        self.batch = batch
        self.result_ttl_s = result_ttl_s
        self.limits = limits
        self.events: deque[ReclaimEvent] = deque(maxlen=events_kept)
        self.claimed_total = 0
        self.dead_lettered_total = 0
        self.stuck_entries = 0  # entries of live workers idle > safety_idle_s (last sweep)
        self._started_ms = _now_ms()
        self._has_beaten = False
        self._last_sweep_s: dict[str, float] = {}
        self._seen_beats: dict[str, tuple[int, int]] = {}  # worker → (beat ms, ttl ms)
        # Redis seen healthy (monotonic s) since; the end of the last prompt beat.
        self._healthy_since_s: float | None = None
        self._last_beat_end_s: float | None = None
        self.reclaims_held_back = 0  # reclaim rounds skipped: Redis not seen healthy enough
        self._reclaim = redis.register_script(RECLAIM)
        self._beat = redis.register_script(BEAT)
        self._dead_letter = redis.register_script(DEAD_LETTER)
        self._dead_letter_raw = redis.register_script(DEAD_LETTER_RAW)

    # --- heartbeat --------------------------------------------------------------------------

    def _beat_value(self, capacity_info: dict[str, Any]) -> str:
        return json.dumps(
            {
                "worker": self.worker,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "ts_ms": _now_ms(),
                "ttl_ms": self.heartbeat_ttl_ms,
                "started_ms": self._started_ms,
                "capacity": capacity_info,
            },
            default=str,
        )

    async def register(self, capacity_info: dict[str, Any], *, wait_s: float | None = None) -> None:
        """First beat: claim the name, waiting up to ``wait_s`` (default: one heartbeat TTL,
        so a crashed predecessor's key expires) while another live process holds it."""
        deadline = time.monotonic() + (self.heartbeat_ttl_ms / 1000 if wait_s is None else wait_s)
        while True:
            started_s = time.monotonic()
            if await self._send_beat(capacity_info, claim=True):
                break
            if time.monotonic() >= deadline:
                raise WorkerError(f"worker name {self.worker!r} is in use by a live worker")
            await asyncio.sleep(0.1)
        self._note_beat(started_s, time.monotonic())
        self._has_beaten = True

    async def beat(self, capacity_info: dict[str, Any]) -> None:
        """Refresh this worker's heartbeat (call every ``HEARTBEAT_INTERVAL_S``)."""
        started_s = time.monotonic()
        try:
            await self._send_beat(capacity_info, claim=False)
        except BaseException:
            self._healthy_since_s = None
            raise
        self._note_beat(started_s, time.monotonic())
        self._has_beaten = True

    async def _send_beat(self, capacity_info: dict[str, Any], *, claim: bool) -> bool:
        """BEAT: the heartbeat key, and (unless draining) the model marked served."""
        model = capacity_info.get("model")
        draining = capacity_info.get("state") == "draining"
        served = model if isinstance(model, str) and not draining else ""
        args: list[str | int] = [self._beat_value(capacity_info), self.heartbeat_ttl_ms, served]
        # The name is claimed in partition 0; every partition gets the beat (RECLAIM checks
        # a lane's owner in the lane's partition, ENQUEUE its partition's served set).
        done = await self._beat(
            keys=[self.keys.heartbeat(self.worker), self.keys.served()],
            args=[*args, "nx" if claim else ""],
        )
        if done:
            await asyncio.gather(
                *(
                    self._beat(
                        keys=[self.keys.heartbeat(self.worker, p), self.keys.served(p)],
                        args=[*args, ""],
                    )
                    for p in self.keys.all_partitions()[1:]
                )
            )
        return bool(done)

    def _note_beat(self, started_s: float, ended_s: float) -> None:
        """A beat landed: Redis stays healthy in our eyes unless this beat was slow or late
        by more than 3/4 of a TTL. A peer beating every interval (a quarter of the TTL)
        loses its key only to an outage of at least TTL - interval, which such a gap or
        round trip would have shown; a shorter limit would only hold reclaims back longer
        whenever this process's loop is busy."""
        limit_s = self.heartbeat_ttl_ms * 0.75 / 1000
        late = self._last_beat_end_s is not None and started_s - self._last_beat_end_s > limit_s
        if self._healthy_since_s is None or late or ended_s - started_s > limit_s:
            self._healthy_since_s = ended_s
        self._last_beat_end_s = ended_s

    def _note_read(self, started_s: float, ended_s: float) -> None:
        """The heartbeats were read: that read is a death verdict only if Redis answered it
        promptly. A ``CLIENT PAUSE`` or an outage that caught this reclaim rather than a
        beat has let every heartbeat expire meanwhile, live workers' too (their beats were
        held up as well): the count starts again."""
        if ended_s - started_s > self.heartbeat_ttl_ms * 0.75 / 1000:
            self._healthy_since_s = ended_s

    def healthy_for_s(self) -> float:
        """How long this reclaimer has seen Redis healthy without a break (0: not now)."""
        if self._healthy_since_s is None:
            return 0.0
        return time.monotonic() - self._healthy_since_s

    def may_reclaim(self) -> bool:
        """Seen healthy longer than a heartbeat TTL: a heartbeat missing now is a death."""
        return self.healthy_for_s() > self.heartbeat_ttl_ms / 1000

    async def retire(self) -> None:
        """Drop the heartbeat (clean exit), so peers reclaim anything left at once."""
        for p in self.keys.all_partitions():  # one key per call: one slot each
            await self.redis.delete(self.keys.heartbeat(self.worker, p))

    # --- reclaim ----------------------------------------------------------------------------

    async def reclaim(self, model: str) -> list[ClaimedEntry]:
        """Claim every dead consumer's pending entries on ``model``'s lanes (dead-lettering
        those delivered too often); runs :meth:`sweep` every ``sweep_interval_s`` too.
        Nothing while Redis has not been seen healthy for a heartbeat TTL (module doc)."""
        if not self._has_beaten:
            # Without our own heartbeat, peers would judge us dead and take the claims back.
            raise WorkerError("beat() or register() before claiming entries")
        lanes = self._all_lanes(model)
        started_s = time.monotonic()
        pipe = self.redis.pipeline(transaction=False)
        for stream in lanes:
            pipe.xinfo_consumers(stream, GROUP)
        replies = await pipe.execute(raise_on_error=False)
        by_lane: dict[str, list[str]] = {}
        for stream, reply in zip(lanes, replies, strict=True):
            if isinstance(reply, ResponseError):  # no stream or no group yet
                continue
            if isinstance(reply, Exception):
                raise reply
            by_lane[stream] = [_s(c["name"]) for c in reply if _s(c["name"]) != self.worker]
        names = sorted({name for names in by_lane.values() for name in names})
        dead = await self._dead_among(names)  # the live ones' beats are remembered
        self._note_read(started_s, time.monotonic())
        if not self.may_reclaim():
            self.reclaims_held_back += bool(dead)
            return []
        claimed: list[ClaimedEntry] = []
        for stream, consumers in by_lane.items():
            for name in consumers:
                if name in dead and self.may_reclaim():  # a claim may find Redis rolled back
                    claimed += await self._claim_from(model, stream, name)
        now_s = time.monotonic()
        if now_s - self._last_sweep_s.get(model, 0.0) >= self.sweep_interval_s:
            self._last_sweep_s[model] = now_s
            claimed += await self.sweep(model)
        return claimed

    async def claim_own(self, model: str) -> list[ClaimedEntry]:
        """At startup under a reused name: take back what a previous process of this name
        left pending (delivery counts go up, so a poison entry still ends as a dead letter)."""
        claimed: list[ClaimedEntry] = []
        for stream in self._all_lanes(model):
            try:
                claimed += await self._claim_from(model, stream, self.worker, own=True)
            except ResponseError as err:
                if "NOGROUP" not in str(err) and "no such key" not in str(err):
                    raise
        return claimed

    async def sweep(self, model: str) -> list[ClaimedEntry]:
        """Safety net: entries idle longer than ``safety_idle_s`` on any consumer. Dead
        owners are reclaimed (same atomic heartbeat check); live owners keep theirs, counted
        in ``stuck_entries`` so a wedged worker shows up in metrics. Plain XAUTOCLAIM is not
        used because it cannot spare a live worker's long-running request."""
        owners: dict[tuple[str, str], int] = {}
        for stream in self._all_lanes(model):
            try:
                rows = await self.redis.xpending_range(
                    stream, GROUP, "-", "+", self.batch, idle=self.safety_idle_ms
                )
            except ResponseError:
                continue
            for row in rows:
                owner = _s(row["consumer"])
                if owner != self.worker:
                    owners[(stream, owner)] = owners.get((stream, owner), 0) + 1
        dead = await self._dead_among(sorted({owner for _, owner in owners}))
        self.stuck_entries = sum(n for (_, owner), n in owners.items() if owner not in dead)
        claimed: list[ClaimedEntry] = []
        for stream, owner in owners:
            if owner in dead:
                claimed += await self._claim_from(model, stream, owner)
        return claimed

    def _all_lanes(self, model: str) -> list[str]:
        """``model``'s lanes in every partition."""
        return [s for p in self.keys.all_partitions() for s in self.keys.request_lanes(model, p)]

    async def _dead_among(self, names: list[str]) -> set[str]:
        """Names whose heartbeat key is missing; remembers the beats of the live ones."""
        # Forget beats of workers gone for an hour (names are not reused forever).
        horizon_ms = _now_ms() - 3_600_000
        for name in [n for n, (beat_ms, _) in self._seen_beats.items() if beat_ms < horizon_ms]:
            del self._seen_beats[name]
        if not names:
            return set()
        values = await self.redis.mget([self.keys.heartbeat(n) for n in names])
        dead: set[str] = set()
        for name, value in zip(names, values, strict=True):
            if value is None:
                dead.add(name)
                continue
            try:
                beat = json.loads(value)
                self._seen_beats[name] = (int(beat["ts_ms"]), int(beat["ttl_ms"]))
            except (ValueError, KeyError, TypeError):
                pass  # a foreign heartbeat format: alive all the same
        return dead

    async def _claim_from(
        self, model: str, stream: str, owner: str, *, own: bool = False
    ) -> list[ClaimedEntry]:
        if not self._has_beaten:
            # Without our own heartbeat, peers would judge us dead and take the claims back.
            raise WorkerError("beat() or register() before claiming entries")
        partition = self.keys.partition_in(stream)
        try:
            reply = await self._reclaim(
                keys=[
                    stream,
                    self.keys.heartbeat(owner, partition),
                    self.keys.heartbeat(self.worker, partition),
                ],
                args=[GROUP, owner, self.worker, self.batch, "1" if own else "0"],
            )
        except ResponseError as err:
            # The lane went away since it was listed (DEL, FLUSHALL): its pending entries
            # with it, so there is nothing to claim; intake re-creates the group.
            if "NOGROUP" in str(err) or "no such key" in str(err):
                return []
            raise
        if int(reply[0]) == -1:
            return []  # it beat again in the meantime: alive
        if int(reply[0]) == -2:
            # Our own beat is gone though we beat on time: Redis lost writes (restarted from
            # older data), every heartbeat may have gone with it. Count again from now.
            self._healthy_since_s = time.monotonic()
            self.reclaims_held_back += 1
            return []
        removed, rows = bool(int(reply[0])), reply[1]
        claimed_ms = _now_ms()
        out: list[ClaimedEntry] = []
        dead_lettered = 0
        for entry_id, count, flat in rows:
            entry = ClaimedEntry(stream, _s(entry_id), _fields(flat), int(count))
            if entry.delivery_count > self.max_deliveries:
                dead_lettered += await self._send_to_dead(model, entry, owner)
            else:
                out.append(entry)
        self.claimed_total += len(out)
        if rows or removed:
            beat_ms, ttl_ms = (None, None) if own else self._seen_beats.get(owner, (None, None))
            self.events.append(
                ReclaimEvent(
                    owner, stream, len(out), dead_lettered, removed, claimed_ms, beat_ms, ttl_ms
                )
            )
        return out

    async def _send_to_dead(self, model: str, entry: ClaimedEntry, owner: str) -> int:
        payload = entry.fields.get(STREAM_FIELD_BYTES, b"")
        reason = (
            f"delivered {entry.delivery_count} times (max {self.max_deliveries}); "
            f"last holder {owner!r} died"
        )
        env: Envelope | None
        try:
            env = decode_envelope(payload, self.limits)
        except ProtocolError:
            env = None
        fields = dead_letter_fields(
            request_id=env.id if env else "",
            model=model,
            lane=entry.stream,
            entry_id=entry.entry_id,
            reason=reason,
            deliveries=entry.delivery_count,
            worker=self.worker,
            dead_worker=owner,
            ts_ms=_now_ms(),
            payload=payload,
        )
        if env is None:
            # No request id to answer: record, ack (giving back its charge) and delete.
            keys, args = dead_letter_raw_call(
                self.keys, model, entry.stream, entry.entry_id, self.worker,
                charged_cost(entry.fields), fields,
            )  # fmt: skip
            reply = await self._dead_letter_raw(keys=keys, args=args)
        else:
            body = result_body(
                Error(
                    code=ErrorCode.DEAD_LETTER.value,
                    message=f"request moved to the dead-letter stream: {reason}",
                    worker=self.worker,
                )
            )
            keys, args = dead_letter_call(
                self.keys,
                env.id,
                env.model,
                entry.stream,
                entry.entry_id,
                self.worker,
                body,
                charged_cost(entry.fields),
                fields,
                self.result_ttl_s,
            )
            reply = await self._dead_letter(keys=keys, args=args)
        done = int(reply) >= 0
        self.dead_lettered_total += done
        return int(done)
