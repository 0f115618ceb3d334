"""The engine's own process, seen from a worker's host process.

The engine child (its loop is :func:`workers.engine_loop.engine_main`) never waits on Redis,
tokenization or detokenization, which all live in the host process. Both directions carry
one msgpack document per batch over a one-way ``multiprocessing`` pipe; every message is
defined in :mod:`workers.engine_wire`. Neither loop blocks on a full pipe: the child has a
sender thread; the host writes from its asyncio loop into its non-blocking end of the pipe
(what does not fit waits in a buffer for ``add_writer``), commands of one loop turn in one
message, no thread hop (a thread that needs the GIL while the loop aggregates can wait a
whole switch interval, 5 ms, before it sends a new request to the engine). If the host
dies, the child sees EOF and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import struct
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from gpu_engine.outputs import EngineCapacity  # plain data, no torch
from workers.engine_loop import engine_main
from workers.engine_wire import (
    NO_CAPACITY,
    AddCommand,
    EngineMessage,
    Fatal,
    Output,
    Outputs,
    Ready,
    abort_command,
    encode_commands,
    read_message,
    stop_command,
)
from workers.errors import WorkerError

OnOutputs = Callable[[list[Output], EngineCapacity], None]


class EngineProcessError(WorkerError):
    """The engine process failed to start or died."""


class HostChannel(NamedTuple):
    """Host number ``host``'s ends of its two pipes to a shared engine process."""

    host: int
    cmd_send: Connection
    out_recv: Connection


# --- the host side --------------------------------------------------------------------------


class EngineProcess:
    """Starts the engine child and exchanges batches with it from the host's asyncio loop.

    ``on_outputs(outputs, capacity)`` is called on the loop for each step batch;
    ``on_fatal(message)`` once if the child fails or vanishes.

    ``host_processes`` > 1 gives the child one command and one output pipe per worker host
    process: this object uses the first pair, ``host_channels()`` hands out the others, and
    each other host talks to the same child through :meth:`attach`. Each host then tags its
    request ids (``@k``) on the way in and strips the tag on the way out.
    """

    def __init__(
        self,
        factory_spec: str,
        model_path: str,
        options: dict[str, Any],
        *,
        torch_threads: int | None = None,
        on_outputs: OnOutputs,
        on_fatal: Callable[[str], None],
        host_processes: int = 1,
    ) -> None:
        self._spec = (factory_spec, model_path, options, torch_threads)
        self._host_processes = host_processes
        self._on_outputs = on_outputs
        self._on_fatal = on_fatal
        self._proc: Any = None
        self._cmd_send: Connection | None = None
        self._out_recv: Connection | None = None
        self._channels: list[HostChannel] = []  # the other hosts' pipe ends, until handed out
        self._tag = "@0" if host_processes > 1 else ""
        # Commands of this loop turn (all of them, until the pipe is there), and framed
        # bytes the pipe did not take yet.
        self._pending: list[list[Any]] = []
        self._flush_scheduled = False
        self._unsent = bytearray()
        self._writing = False  # add_writer is registered for the command pipe
        self._ready: asyncio.Future[Ready] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead = False
        self._pid: int | None = None
        self.capacity = NO_CAPACITY
        self.eos_token_ids: list[int] = []
        self.max_model_len: int | None = None  # the engine's context length, once ready

    @classmethod
    def attach(
        cls,
        channel: HostChannel,
        *,
        on_outputs: OnOutputs,
        on_fatal: Callable[[str], None],
    ) -> EngineProcess:
        """This host's side of an engine process another host started (``host_channels``)."""
        self = cls("", "", {}, on_outputs=on_outputs, on_fatal=on_fatal)
        self._cmd_send, self._out_recv = channel.cmd_send, channel.out_recv
        self._tag = f"@{channel.host}"
        return self

    def host_channels(self) -> list[HostChannel]:
        """The pipe ends of hosts 1..n-1, to pass to their processes once (then
        ``close_host_channels`` here, so a host that dies closes its pipes for good)."""
        return list(self._channels)

    def close_host_channels(self) -> None:
        for ch in self._channels:
            ch.cmd_send.close()
            ch.out_recv.close()
        self._channels = []

    async def start(self, timeout_s: float = 600.0) -> None:
        """Start the child (or, attached, wait for the running one's ``ready``)."""
        self._loop = asyncio.get_running_loop()
        if self._cmd_send is None:
            self._spawn()
        assert self._cmd_send is not None and self._out_recv is not None
        os.set_blocking(self._cmd_send.fileno(), False)
        self._schedule_flush()  # commands queued before the start
        self._ready = self._loop.create_future()
        self._loop.add_reader(self._out_recv.fileno(), self._on_readable)
        try:
            ready = await asyncio.wait_for(asyncio.shield(self._ready), timeout_s)
        except BaseException:
            await self.stop(timeout_s=1.0)
            raise
        self.eos_token_ids = ready.eos_token_ids
        self.max_model_len = ready.max_model_len
        self.capacity = ready.capacity
        self._pid = ready.pid

    def _spawn(self) -> None:
        ctx = mp.get_context("spawn")
        pipes = [(ctx.Pipe(duplex=False), ctx.Pipe(duplex=False))
                 for _ in range(self._host_processes)]  # fmt: skip
        self._proc = ctx.Process(
            target=engine_main,
            args=([c[0] for c, _ in pipes], [o[1] for _, o in pipes], *self._spec),
            name="chatq-engine",
            daemon=True,
        )
        self._proc.start()
        for (cmd_recv, _), (_, out_send) in pipes:
            cmd_recv.close()
            out_send.close()
        (_, self._cmd_send), (self._out_recv, _) = pipes[0]
        self._channels = [
            HostChannel(k, cmd_send, out_recv)
            for k, ((_, cmd_send), (out_recv, _)) in enumerate(pipes)
            if k > 0
        ]

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def alive(self) -> bool:
        return not self._dead and self._proc is not None and self._proc.is_alive()

    def add(self, commands: Sequence[AddCommand]) -> None:
        """Send at once (after whatever this loop turn queued before them): an intake batch
        is one call, and a request's time to the engine should not wait for the loop's
        other ready callbacks."""
        if commands:
            tag = self._tag
            self._pending.extend([c.to_wire(tag) for c in commands])
            if self._cmd_send is not None:
                self._flush()
            else:
                self._schedule_flush()

    def abort(self, request_ids: Sequence[str]) -> None:
        if request_ids:
            tag = self._tag
            self._pending.extend([abort_command(rid, tag) for rid in request_ids])
            self._schedule_flush()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the child to stop, wait for it, kill it if it does not. Attached (or with
        several hosts), ``stop`` says this host is done; the child stops once all are."""
        self._pending.append(stop_command())
        self._flush()
        if self._unsent and self._cmd_send is not None and not self._dead:
            # The rest, ``stop`` last, must arrive: a host pipe that closes without it
            # means a dead host to the child.
            self._stop_writing()
            with contextlib.suppress(OSError):
                os.set_blocking(self._cmd_send.fileno(), True)
                while self._unsent:
                    del self._unsent[: os.write(self._cmd_send.fileno(), self._unsent)]
            self._unsent.clear()
        if self._loop is not None and self._out_recv is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._out_recv.fileno())
        proc = self._proc
        if proc is not None and proc.pid is not None:  # started
            await asyncio.get_running_loop().run_in_executor(None, proc.join, timeout_s)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        self._dead = True
        self._stop_writing()
        for conn in (self._cmd_send, self._out_recv):
            if conn is not None:
                conn.close()

    # --- internals ---

    def _schedule_flush(self) -> None:
        """Send this loop turn's commands together once the running callback yields."""
        if not self._flush_scheduled and self._loop is not None and self._cmd_send is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending or self._cmd_send is None or self._dead:
            return
        data = encode_commands(self._pending)
        self._pending = []
        # multiprocessing.Connection's framing: a big-endian int32 length (-1 + uint64 past
        # 2 GiB), then the bytes; the child reads it with recv_bytes.
        n = len(data)
        header = struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)
        self._unsent += header
        self._unsent += data
        if not self._writing:
            self._write_some()

    def _write_some(self) -> None:
        """Write what the pipe takes now; wait for it to drain for the rest (order kept)."""
        assert self._cmd_send is not None and self._loop is not None
        try:
            while self._unsent:
                written = os.write(self._cmd_send.fileno(), self._unsent)
                del self._unsent[:written]
        except BlockingIOError:
            if not self._writing:
                self._writing = True
                self._loop.add_writer(self._cmd_send.fileno(), self._write_some)
            return
        except OSError:  # the child is gone: the reader reports it (EOF)
            self._unsent.clear()
        self._stop_writing()

    def _stop_writing(self) -> None:
        if self._writing and self._loop is not None and self._cmd_send is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._cmd_send.fileno())
        self._writing = False

    def _on_readable(self) -> None:
        assert self._out_recv is not None
        try:
            while self._out_recv.poll(0):
                self._dispatch(read_message(self._out_recv.recv_bytes(), self._tag))
        except (EOFError, OSError):
            self._fail("the engine process exited unexpectedly")

    def _dispatch(self, message: EngineMessage) -> None:
        if isinstance(message, Outputs):
            if message.capacity is not None:
                self.capacity = message.capacity
            self._on_outputs(message.outputs, self.capacity)
        elif isinstance(message, Ready):
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(message)
        elif isinstance(message, Fatal):
            self._fail(f"engine failed: {message.message}")

    def _fail(self, message: str) -> None:
        if self._dead:
            return
        self._dead = True
        if self._loop is not None and self._out_recv is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._out_recv.fileno())
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(EngineProcessError(message))
        else:
            self._on_fatal(message)
