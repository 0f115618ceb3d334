"""Every Lua script of the contract, loaded from ``producer/contract/lua/``.

Each ``.lua`` file starts with its documentation (KEYS, ARGV, return value); a producer in
another language loads the same file (``SCRIPT LOAD`` + ``EVALSHA``), and
``docs/protocol.md`` describes each one. Scripts run atomically on the Redis server, so
each multi-key state change is one step:

- ENQUEUE (producers): id reservation, idempotency, the backlog cost and bounds, XADD, for
  one request or many.
- CANCEL (producers): check the caller's cancel token, then mark and announce a cancel.
- PULL / REQUEUE (workers): read a model's lanes in aging order; hand an entry back.
- FINALIZE / FINALIZE_MANY (workers): write the final result if none exists, XACK + XDEL,
  give the backlog back. DEAD_LETTER is FINALIZE behind a prefix that records the dead
  letter in the same step; DEAD_LETTER_RAW parks an entry nobody can answer.
- CHUNKS (workers): append streamed chunks, each only while its entry is still pending on
  the writing worker (FINALIZE_MANY has the same fence).
- RECLAIM (workers): move a dead worker's pending entries to a live one.
- BEAT (workers): the heartbeat, and the model marked served for ENQUEUE's live check.
- PURGE / DEAD_REQUEUE (operators): drop a lane's queued entries; run a dead letter again.
"""

from __future__ import annotations

from importlib import resources


def lua(name: str) -> str:
    """The source of ``lua/<name>.lua``."""
    return resources.files("producer.contract").joinpath(f"lua/{name}.lua").read_text("utf-8")


ENQUEUE = lua("enqueue")
CANCEL = lua("cancel")
PULL = lua("pull")
RECLAIM = lua("reclaim")
BEAT = lua("beat")
PURGE = lua("purge")
DEAD_REQUEUE = lua("dead_requeue")
# The scripts that end an entry share FINALIZE's functions (``write`` and ``release``).
FINALIZE_LIB = lua("finalize_lib")
FINALIZE = FINALIZE_LIB + lua("finalize")
FINALIZE_MANY = FINALIZE_LIB + lua("finalize_many")
CHUNKS = FINALIZE_LIB + lua("chunks")
DEAD_LETTER = lua("dead_letter") + FINALIZE
DEAD_LETTER_RAW = FINALIZE_LIB + lua("dead_letter_raw")
REQUEUE = FINALIZE_LIB + lua("requeue")
