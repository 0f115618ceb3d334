"""Every Redis key name chatq uses, and how long each lives.

One place for the layout (``docs/protocol.md``, "Keys"); producer and workers both build
names here, so a change of layout is made here alone (and in the Lua scripts that build
names from the prefix and a partition's hash tag).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from producer.errors import ChatqError

MAX_PARTITIONS = 1024
"""The most partitions a deployment may split its queue into."""

PRIORITIES: tuple[str, ...] = ("high", "normal", "low")
"""Priority lanes, highest first. Each lane is its own request stream."""

GROUP = "workers"
"""Consumer group every worker joins on every request stream."""

STREAM_FIELD = "m"
"""Field of a request-stream entry holding the msgpack envelope."""

RESUME_FIELD = "r"
"""Field of a request-stream entry REQUEUE added (``1``): the request may have chunks of a
half-finished answer in its result stream, which its next worker continues."""

COST_FIELD = "c"
"""Field of a request-stream entry holding the backlog cost ENQUEUE charged for it (tokens,
a decimal integer): what the worker gives back when it acks the entry."""

# Result streams outlive the request long enough for a slow client to read the answer,
# but not forever: 1 hour after the last write.
RESULT_TTL_S = 3600
# A worker's heartbeat key expires this long after its last beat; a worker beats every
# HEARTBEAT_INTERVAL_S, so a missing key means the process is gone (or stalled > TTL).
HEARTBEAT_TTL_S = 2
HEARTBEAT_INTERVAL_S = 0.5
# Idempotency keys map to a request id for as long as the result is kept: a retry within
# that window gets the same id and can still read the answer.
IDEMPOTENCY_TTL_S = RESULT_TTL_S
# A cancel marker only needs to outlive the request it cancels.
CANCELLED_TTL_S = 86_400
# A model's backlog hash outlives its last queued request by this long (its drain rate is
# still worth knowing after a short lull), then expires: idle models leave nothing behind.
IDLE_BACKLOG_TTL_S = 86_400
# The cancel stream only needs to outlive running requests; it is trimmed by length.
CANCEL_MAXLEN = 10_000
# The dead-letter stream keeps the newest entries only.
DEAD_MAXLEN = 100_000
# A tenant's rate-limit buckets are full again a minute after its last request; kept a
# little longer than that, then they expire (a fresh bucket is a full one).
LIMIT_BUCKETS_TTL_S = 120
# Records of failed webhook deliveries (``chatq status`` shows them): the newest only.
WEBHOOK_FAILED_MAXLEN = 10_000


def partition_of(request_id: str, partitions: int) -> int:
    """The partition a request id belongs to: the first 32 bits of the SHA-1 of its UTF-8
    bytes, modulo ``partitions``. Anyone holding the id (and the deployment's partition
    count) finds its result stream; a producer that generates ids picks one that lands in
    the partition it wants (:func:`producer.contract.envelope.new_request_id`)."""
    if partitions == 1:
        return 0
    digest = hashlib.sha1(request_id.encode("utf-8", "surrogatepass"), usedforsecurity=False)
    return int(digest.hexdigest()[:8], 16) % partitions


def check_partitions(partitions: object) -> None:
    """Raise :class:`ChatqError` naming ``partitions`` unless it is an integer in
    [1, :data:`MAX_PARTITIONS`]."""
    if (
        isinstance(partitions, bool)
        or not isinstance(partitions, int)
        or not 1 <= partitions <= MAX_PARTITIONS
    ):
        raise ChatqError(f"partitions must be an integer in [1, {MAX_PARTITIONS}]: {partitions!r}")


def partition_tag(partition: int) -> str:
    """The Redis Cluster hash tag of a partition: every key one script call touches carries
    the tag of one partition, so the call touches one hash slot. ``q`` + the number: the
    tags of partitions 0, 1, 2 hash to slots in three different thirds of the slot space
    (one per master of a cluster made with ``redis-cli --cluster create`` on 3 masters)."""
    return f"{{q{partition}}}"


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (``chatq`` by default), split into ``partitions``.

    Every key the queue's scripts touch is ``<prefix>:<kind>:{q<p>}[:<rest>]``: the hash
    tag ``{q<p>}`` of partition ``p`` puts all of a partition's keys in one Redis Cluster
    hash slot. What is global on one Redis (totals, bounds, the served set, the cancel and
    dead-letter streams, heartbeats) has one copy per partition. A request id's keys (its
    result, final marker, reservation, cancel marker) are in the partition of the id
    (:func:`partition_of`); a model's lanes and backlog exist once per partition. With one
    partition (the default) every key carries ``{q0}``."""

    prefix: str = "chatq"
    partitions: int = 1

    def __post_init__(self) -> None:
        check_partitions(self.partitions)

    def _name(self, kind: str, partition: int, rest: str | None = None) -> str:
        name = f"{self.prefix}:{kind}:{partition_tag(partition)}"
        return name if rest is None else f"{name}:{rest}"

    def partition_of(self, request_id: str) -> int:
        """The partition of a request id (:func:`partition_of`)."""
        return partition_of(request_id, self.partitions)

    def all_partitions(self) -> range:
        return range(self.partitions)

    @staticmethod
    def partition_in(name: str) -> int:
        """The partition of a key name built here (the number in its ``{q<p>}`` tag)."""
        start = name.index("{q") + 2
        return int(name[start : name.index("}", start)])

    def requests(self, model: str, priority: str, partition: int = 0) -> str:
        return self._name("req", partition, f"{model}:{priority}")

    def request_lanes(self, model: str, partition: int = 0) -> list[str]:
        """A model's lanes in one partition, highest priority first."""
        return [self.requests(model, p, partition) for p in PRIORITIES]

    def result(self, request_id: str) -> str:
        return self._name("res", self.partition_of(request_id), request_id)

    def heartbeat(self, worker: str, partition: int = 0) -> str:
        """A worker's heartbeat in one partition: a worker beats in every partition (RECLAIM
        checks the owner's beat in the partition of the lane it reclaims)."""
        return self._name("hb", partition, worker)

    def heartbeat_pattern(self, partition: int = 0) -> str:
        return self._name("hb", partition, "*")

    def dead(self, partition: int = 0) -> str:
        """Dead-letter stream of one partition (the dead requests queued in it)."""
        return self._name("dead", partition)

    def idempotency(self, scope_digest: str, partition: int = 0) -> str:
        """Idempotency record of one (model, tenant, key) scope, by its SHA-1 (computed by
        ENQUEUE: :func:`producer.contract.enqueue.idempotency_scope`), in the partition the
        scope decides (:func:`producer.contract.enqueue.scope_partition`)."""
        return self._name("idem", partition, scope_digest)

    def reservation(self, request_id: str) -> str:
        """A queued request's id reservation: ``<lane>/<entry id> <cancel digest>``
        (ENQUEUE; :mod:`producer.contract.reservation`)."""
        return self._name("id", self.partition_of(request_id), request_id)

    def bounds(self, partition: int = 0) -> str:
        """Hash of the queue's bounds, set by operators (``QueueBounds``) in every partition;
        read by ENQUEUE (which gives each partition its share of the token bounds)."""
        return self._name("bounds", partition)

    def totals(self, partition: int = 0) -> str:
        """Hash of what is queued across all models in one partition: ``tokens``,
        ``models`` (with requests)."""
        return self._name("totals", partition)

    def backlog(self, model: str, partition: int = 0) -> str:
        return self._name("backlog", partition, model)

    def cancel(self, partition: int = 0) -> str:
        """Cancel stream of one partition (cancels of the request ids in it)."""
        return self._name("cancel", partition)

    def final(self, request_id: str) -> str:
        """Marker set once a request has its final (done/error) result: effectively-once."""
        return self._name("final", self.partition_of(request_id), request_id)

    def cancelled(self, request_id: str) -> str:
        """Marker set by ``cancel``; intake skips a queued request that has it."""
        return self._name("cancelled", self.partition_of(request_id), request_id)

    def served(self, partition: int = 0) -> str:
        """Sorted set: model → Unix ms (Redis's clock) until which a live worker serves it,
        pushed forward by every heartbeat (BEAT, in every partition); ENQUEUE refuses
        requests for a model whose score has passed, unless the producer opts in. Models
        gone for a day are dropped."""
        return self._name("served", partition)

    def models(self, partition: int = 0) -> str:
        """Set of model names that have ever had a request queued in one partition (for
        ``chatq status``)."""
        return self._name("models", partition)

    # --- the HTTP gateway: API keys, tenants, jobs (no TTL unless said) ---

    def api_key(self, digest: str) -> str:
        """Hash of one API key, by the SHA-256 of the key (the key itself is never stored):
        tenant, key id. Deleted on revoke."""
        return f"{self.prefix}:apikey:{digest}"

    @property
    def api_keys(self) -> str:
        """Hash key id → JSON record (tenant, digest, created), for ``chatq keys list``."""
        return f"{self.prefix}:apikeys"

    def tenant(self, name: str) -> str:
        """Hash of one tenant: limits (rpm, tpm, max_concurrent) and webhook secret."""
        return f"{self.prefix}:tenant:{name}"

    @property
    def tenants(self) -> str:
        """Set of tenant names (for metrics and listings)."""
        return f"{self.prefix}:tenants"

    def tenant_buckets(self, name: str) -> str:
        """Hash of a tenant's rpm / tpm token buckets (TTL ``LIMIT_BUCKETS_TTL_S``)."""
        return f"{self.prefix}:limit:{name}"

    def tenant_inflight(self, name: str) -> str:
        """Sorted set of a tenant's requests in flight, scored by lease expiry (Unix ms):
        a gateway that dies leaves nothing counted past the lease."""
        return f"{self.prefix}:inflight:{name}"

    def tenant_stats(self, name: str) -> str:
        """Hash of a tenant's counters (requests, cost tokens, refusals by reason)."""
        return f"{self.prefix}:tstats:{name}"

    def job(self, request_id: str) -> str:
        """Hash of a job created through the gateway (owner tenant, model, created);
        lives as long as the job's result (the gateway's ``job_result_ttl_s``)."""
        return f"{self.prefix}:job:{request_id}"

    @property
    def webhook_queue(self) -> str:
        """arq's queue (sorted set) of webhook deliveries, served by ``chatq webhooks``."""
        return f"{self.prefix}:webhooks"

    def webhook_job_id(self, request_id: str) -> str:
        """arq job id of a request's delivery: one per request, however often its final is
        written (arq keeps the job under ``arq:job:<this id>``)."""
        return f"{self.prefix}:webhook:{request_id}"

    @property
    def webhook_failed(self) -> str:
        """Stream of deliveries given up on (``WEBHOOK_FAILED_MAXLEN`` newest)."""
        return f"{self.prefix}:webhook:failed"

    @property
    def webhook_stats(self) -> str:
        """Hash of delivery counters: delivered, retried, failed."""
        return f"{self.prefix}:webhook:stats"
