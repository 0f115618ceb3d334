"""The HTTP port of a chatq process: ``/metrics`` (Prometheus), ``/health`` and ``/ready``.

``/health`` answers 200 while the process's event loop turns (a wedged loop fails it: restart
the process); ``/ready`` answers 200 once the process can do its work (a worker: engine
loaded and heartbeating; the exporter: Redis read lately) and 503 otherwise, with the reason
in the body. The server runs in a daemon thread and reads only plain attributes, so a scrape
never waits for the loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOOP_STALL_S = 10.0  # a loop that has not ticked for this long is not healthy

Check = Callable[[], str | None]  # None: fine; else the reason it is not


class Probe:
    """Liveness of an asyncio loop: the loop calls ``tick()`` often; ``stalled()`` says
    whether it has not for ``LOOP_STALL_S``."""

    def __init__(self) -> None:
        self.last_tick_s = time.monotonic()

    def tick(self) -> None:
        self.last_tick_s = time.monotonic()

    def stalled(self) -> str | None:
        idle_s = time.monotonic() - self.last_tick_s
        return f"event loop stalled for {idle_s:.1f} s" if idle_s > LOOP_STALL_S else None


class MetricsServer:
    """``/metrics`` from ``registry``; ``/health`` from ``health``; ``/ready`` from ``ready``."""

    def __init__(self, registry: Any, health: Check, ready: Check) -> None:
        self.registry = registry
        self.health = health
        self.ready = ready
        self._server: ThreadingHTTPServer | None = None

    def start(self, port: int, host: str = "0.0.0.0") -> int:
        """Listen on ``host:port`` (0: any free port) in a daemon thread; returns the port."""
        handler = _handler(self)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        thread = threading.Thread(
            target=self._server.serve_forever, name="chatq-metrics", daemon=True
        )
        thread.start()
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _handler(server: MetricsServer) -> type[BaseHTTPRequestHandler]:
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        """``/metrics``, ``/health`` and ``/ready`` of this server."""

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
            elif path in ("/health", "/ready"):
                check = server.health if path == "/health" else server.ready
                problem = check()
                body = b"ok\n" if problem is None else f"{problem}\n".encode()
                self._send(200 if problem is None else 503, body, "text/plain; charset=utf-8")
            else:
                self._send(404, b"not found: try /metrics, /health or /ready\n", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would flood the worker's log

    return Handler
