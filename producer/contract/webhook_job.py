"""The webhook delivery job: what a worker queues for ``chatq webhooks`` (an arq worker).

The worker writes it when a request with a ``callback_url`` gets its final result, in arq's
own job layout (a map ``{t, f, a, k, et}`` under ``arq:job:<id>`` plus the id in the queue's
sorted set) with msgpack as the serializer: arq reads it with :func:`deserialize` (no
pickle anywhere). The job id is :meth:`Keys.webhook_job_id` of the request id, so a final
written twice (a redelivered request) never queues a second delivery. The job carries the
final result itself (kind ``done`` / ``error`` and its msgpack body, as in the result
stream), so delivery does not depend on how long the result stream is kept.
"""

from __future__ import annotations

from typing import Any

import msgpack

DELIVER_FUNCTION = "deliver_webhook"
"""The arq function name of a delivery."""
JOB_KEY_PREFIX = "arq:job:"
"""arq's job key prefix (``arq.constants.job_key_prefix``)."""
RESULT_KEY_PREFIX = "arq:result:"
"""arq's result key prefix (``arq.constants.result_key_prefix``)."""
# A delivery is retried for up to a day; its job key must outlive that (arq drops a job
# whose key has expired), with an hour to spare.
JOB_TTL_MS = 25 * 3600 * 1000
MAX_JOB_BYTES = 80 << 20  # a final result body is at most 64 MiB (the result decoder's bound)


def encode_job(
    request_id: str,
    callback_url: str,
    tenant: str | None,
    model: str,
    kind: str,
    body: bytes,
    enqueue_ms: int,
) -> bytes:
    """arq's serialized job for one delivery (``serialize_job`` with msgpack)."""
    packed: bytes = msgpack.packb(
        {
            "t": None,
            "f": DELIVER_FUNCTION,
            "a": [request_id],
            "k": {
                "callback_url": callback_url,
                "tenant": tenant,
                "model": model,
                "kind": kind,
                "body": body,
            },
            "et": enqueue_ms,
        },
        use_bin_type=True,
    )
    return packed


def serialize(obj: Any) -> bytes:
    """arq's ``job_serializer``: msgpack (never pickle)."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def deserialize(data: bytes) -> Any:
    """arq's ``job_deserializer``: msgpack, every length bounded."""
    return msgpack.unpackb(
        data,
        raw=False,
        max_str_len=MAX_JOB_BYTES,
        max_bin_len=MAX_JOB_BYTES,
        max_array_len=1 << 16,
        max_map_len=1 << 16,
        max_ext_len=0,
    )
