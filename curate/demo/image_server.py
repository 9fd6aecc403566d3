"""A small real HTTP server on 127.0.0.1 for tests and the demo: serves registered byte bodies.

    with ImageServer() as server:
        server.add("/red.jpg", jpeg_bytes)
        server.add("/gone.jpg", b"", status=500)
        fetch(server.url("/red.jpg"))
        assert server.hits["/red.jpg"] == 1

Unknown paths get a 404. Nothing is logged per request. For hostile-input tests a route can also
redirect (`redirect`), wait before answering (`delay_s`), drip its body a byte at a time
(`drip_s`), stream without end (`endless`), or answer differently on each hit (`add_sequence`,
e.g. a 503 with Retry-After, then the image). `max_in_flight` is the most requests waiting for their answer to start at once.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Optional


@dataclass(frozen=True)
class Route:
    body: bytes
    content_type: str = "image/jpeg"
    status: int = 200
    headers: dict[str, Any] = field(default_factory=dict)  # a list value sends the header once per item
    delay_s: float = 0.0  # wait before the status line
    drip_s: float = 0.0  # > 0: send the body one byte every drip_s seconds
    endless: bool = False  # stream 64 KiB chunks until the client hangs up (no Content-Length)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._respond(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        owner = self.server.owner
        route = owner._record(self.path)
        counted = True
        try:
            if route is None:
                route = Route(b"not found", content_type="text/plain", status=404)
            if route.delay_s:
                time.sleep(route.delay_s)
            # "in flight" ends when the answer starts: a client cannot have its next request on
            # the same connection slot under way before then, so max_in_flight has no races
            owner._done()
            counted = False
            self.send_response(route.status)
            self.send_header("Content-Type", route.content_type)
            if not route.endless:
                self.send_header("Content-Length", str(len(route.body)))
            for name, value in route.headers.items():
                for one in value if isinstance(value, (list, tuple)) else [value]:  # a list: that header several times
                    self.send_header(name, one)
            self.end_headers()
            if not send_body:
                return
            if route.endless:
                chunk = (route.body or b"\xff\xd8\xff\xe0") * (65536 // max(1, len(route.body or b"1234")))
                while not owner._closing.is_set():
                    self.wfile.write(chunk)
            elif route.drip_s > 0:
                for i in range(len(route.body)):
                    if owner._closing.is_set():
                        break
                    self.wfile.write(route.body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(route.drip_s)
            else:
                self.wfile.write(route.body)
        finally:
            if counted:
                owner._done()

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
        self._sequences: dict[str, list[Route]] = {}
        self._in_flight = 0
        self.max_in_flight = 0
        self._closing = threading.Event()
        self._server = _Server(self, host)
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"ImageServer:{self.port}",
            daemon=True,
        )
        self._thread.start()

    # --- routes -----------------------------------------------------------------------------------
    def add(
        self,
        path: str,
        body: bytes,
        content_type: str = "image/jpeg",
        status: int = 200,
        headers: Optional[dict[str, Any]] = None,
        delay_s: float = 0.0,
        drip_s: float = 0.0,
        endless: bool = False,
    ) -> str:
        """Register (or replace) what `path` serves; returns its full URL."""
        path = _norm(path)
        with self._lock:
            self._routes[path] = Route(bytes(body), content_type, status, dict(headers or {}), delay_s, drip_s, endless)
            self._sequences.pop(path, None)
        return self.url(path)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        """`path` answers `status` with a Location header (absolute or relative); returns its URL."""
        return self.add(path, b"", content_type="text/plain", status=status, headers={"Location": location})

    def add_sequence(self, path: str, routes: list[Route]) -> str:
        """The n-th request for `path` gets routes[n]; once they run out, the last one repeats."""
        path = _norm(path)
        with self._lock:
            self._sequences[path] = list(routes)
            self._routes[path] = routes[-1]
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{_norm(path)}"

    @property
    def hits(self) -> Counter[str]:
        """A snapshot: request path (as sent, query included) -> number of requests."""
        with self._lock:
            return Counter(self._hits)

    def _record(self, path: str) -> Optional[Route]:
        """Count the request, mark it in flight and pick its route."""
        with self._lock:
            n = self._hits[path]
            self._hits[path] += 1
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            seq = self._sequences.get(path)
            if seq:
                return seq[min(n, len(seq) - 1)]
            return self._routes.get(path)

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1

    # --- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        self._closing.set()  # endless and dripping responses stop
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
