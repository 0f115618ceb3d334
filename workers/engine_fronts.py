"""The host processes an engine process serves, seen from the engine: their pipes.

:class:`Fronts` reads every host's command pipe and remembers which host owns each request;
:func:`sender` is the engine's sender thread, which writes output documents to the hosts'
pipes so the engine loop never blocks on a full one.
"""

from __future__ import annotations

import queue
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any

from workers.engine_wire import STOP, command_kind, decode_commands

# (host index, encoded document), or None: the sender thread ends.
Outbox = queue.SimpleQueue[tuple[int, bytes] | None]


def sender(conns: list[Connection], outbox: Outbox) -> None:
    """The sender thread: hand each document to its host's pipe, in order."""
    gone: set[int] = set()  # hosts whose pipe broke (their command pipe reports it)
    while True:
        item = outbox.get()
        if item is None:
            return
        front, data = item
        if front in gone:
            continue
        try:
            conns[front].send_bytes(data)
        except (BrokenPipeError, OSError):
            gone.add(front)


class Fronts:
    """The host processes this engine serves (``--host-processes``): their command pipes,
    which of them owns each request, and which are still open.

    With one host process everything goes to it. With several, each host tags its request
    ids (so two hosts holding the same request never collide here), and a step's outputs
    are split by owner. A host that sends ``stop`` is done: its requests are aborted and its
    pipe is no longer read; the loop ends when every host is done. A pipe that closes
    without ``stop`` means its host died: the loop ends (EOFError), every other host sees
    the engine go and exits, and the queue's reclaim takes over.
    """

    def __init__(self, conns: list[Connection]) -> None:
        self.conns = conns
        self.reading = list(range(len(conns)))  # hosts whose ``stop`` has not arrived
        self.serving = set(range(len(conns)))  # hosts whose ``stop`` has not been applied
        self.owner: dict[str, int] = {}  # request id → host index (several hosts only)
        self.many = len(conns) > 1

    def receive(self, block_s: float, backlog: deque[tuple[int, list[Any]]]) -> None:
        """Append every command waiting on the pipes; wait up to ``block_s`` for one. A
        pipe is not read past its ``stop`` (its host may close it right after)."""
        conns = self.conns
        ready: list[Any]
        if not self.many:  # one pipe: a poll, no select
            ready = [conns[0]] if self.reading and conns[0].poll(block_s) else []
        elif self.reading:
            ready = wait([conns[k] for k in self.reading], block_s)
        else:
            return
        for k in list(self.reading):
            conn = conns[k]
            got = conn in ready
            while got:
                batch = decode_commands(conn.recv_bytes())
                backlog.extend([(k, c) for c in batch])
                if batch and command_kind(batch[-1]) == STOP:  # a host's last command
                    self.reading.remove(k)
                    break
                got = conn.poll(0)

    def added(self, front: int, request_id: str) -> None:
        if self.many:
            self.owner[request_id] = front

    def forget(self, request_id: str) -> None:
        if self.many:
            self.owner.pop(request_id, None)

    def close(self, front: int, engine: Any) -> bool:
        """Host ``front`` is done: abort what it still owns; True when no host is left."""
        self.serving.discard(front)
        if self.many:
            for rid in [r for r, k in self.owner.items() if k == front]:
                engine.abort(rid)
                del self.owner[rid]
        return not self.serving

    def split(self, rows: list[Any]) -> list[list[Any]]:
        """One step's output rows (request id first, finished third) per host."""
        if not self.many:
            return [rows]
        parts: list[list[Any]] = [[] for _ in self.conns]
        owner = self.owner
        for row in rows:
            rid = row[0]
            k = owner.get(rid)
            if k is None:
                continue  # aborted by its host, which answered it already
            parts[k].append(row)
            if row[2]:
                del owner[rid]
        return parts
