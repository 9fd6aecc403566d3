"""A small real HTTP server on 127.0.0.1 for tests and the demo: serves registered byte bodies.

    with ImageServer() as server:
        server.add("/red.jpg", jpeg_bytes)
        server.add("/gone.jpg", b"", status=500)
        fetch(server.url("/red.jpg"))
        assert server.hits["/red.jpg"] == 1

Unknown paths get a 404. Nothing is logged per request.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Optional


@dataclass(frozen=True)
class Route:
    body: bytes
    content_type: str = "image/jpeg"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._respond(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        owner = self.server.owner
        owner._record(self.path)
        route = owner._route(self.path)
        if route is None:
            route = Route(b"not found", content_type="text/plain", status=404)
        self.send_response(route.status)
        self.send_header("Content-Type", route.content_type)
        self.send_header("Content-Length", str(len(route.body)))
        for name, value in route.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(route.body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (base class's name)
        pass  # quiet: no per-request line on stderr


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: "ImageServer", host: str) -> None:
        self.owner = owner
        super().__init__((host, 0), _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # a client that hung up early is not a server bug
        super().handle_error(request, client_address)  # anything else: print the traceback


class ImageServer:
    """ThreadingHTTPServer on a free port of a loopback address (127.0.0.1 by default), serving in a daemon thread.

    Starts on construction (or on `with`), stops on `close()` or leaving the `with` block.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        if not host.startswith("127."):
            raise ValueError(f"ImageServer binds loopback addresses only (127.0.0.0/8), not {host!r}")
        self._lock = threading.Lock()
        self._routes: dict[str, Route] = {}
        self._hits: Counter[str] = Counter()
        self._server = _Server(self, host)
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"ImageServer:{self.port}", daemon=True
        )
        self._thread.start()

    # --- routes -----------------------------------------------------------------------------------
    def add(
        self,
        path: str,
        body: bytes,
        content_type: str = "image/jpeg",
        status: int = 200,
        headers: Optional[dict[str, str]] = None,
    ) -> str:
        """Register (or replace) what `path` serves; returns its full URL."""
        path = _norm(path)
        with self._lock:
            self._routes[path] = Route(bytes(body), content_type, status, dict(headers or {}))
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{_norm(path)}"

    @property
    def hits(self) -> Counter[str]:
        """A snapshot: request path (as sent, query included) -> number of requests."""
        with self._lock:
            return Counter(self._hits)

    def _record(self, path: str) -> None:
        with self._lock:
            self._hits[path] += 1

    def _route(self, path: str) -> Optional[Route]:
        with self._lock:
            return self._routes.get(path)

    # --- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> "ImageServer":
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


def _norm(path: str) -> str:
    return path if path.startswith("/") else "/" + path
