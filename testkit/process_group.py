"""A group of local redis-server processes in one temporary directory, stopped together:
the lifetime :class:`testkit.cluster.LocalCluster` and :class:`testkit.sentinel.SentinelGroup`
share."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import TypeVar

_G = TypeVar("_G", bound="ProcessGroup")  # typing.Self is Python 3.11+


class ProcessGroup:
    """Subclasses start their processes in :meth:`start` and list them in
    :meth:`processes`; ``with`` stops every one (and removes the directory) on the way out,
    also when starting failed half-way."""

    def __init__(self, prefix: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=prefix)
        self.dir = Path(self._tmp.name)

    def start(self: _G) -> _G:
        raise NotImplementedError

    def processes(self) -> list[subprocess.Popen[bytes]]:
        raise NotImplementedError

    def stop(self) -> None:
        procs = self.processes()
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._tmp.cleanup()

    def __enter__(self: _G) -> _G:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
