"""A bounded, SSRF-guarded HTTP GET on http.client (no urllib, no proxies from the environment).

    fetcher = GuardedFetcher(policy, timeout_s=10, max_bytes=32 << 20, max_redirects=5, user_agent=...)
    got = fetcher.get(url, deadline=time.monotonic() + 30, on_headers=check)   # or raises FetchFailure

- Every hop: the URL must be http(s); the host is resolved once, *every* resolved address is checked
  against the AddressPolicy (a name with any refused address is refused: DNS rebinding and mixed
  records fail), and the socket connects to one of those checked addresses, never to the name
  again. Redirects (301/302/303/307/308) are followed by hand, each hop re-checked, at most
  `max_redirects` of them.
- Time: `timeout_s` bounds each socket operation; `deadline` (monotonic) bounds the whole request,
  headers and body included: a process-wide watchdog thread shuts the socket down at the deadline,
  which wakes any blocked connect/recv/TLS read, so a 1-byte-per-second or endless stream frees
  its thread at the deadline, not at the end of the stream. DNS resolution is not interruptible
  (getaddrinfo); its own resolver timeout applies.
- Size: a Content-Length above `max_bytes` is refused before reading; otherwise the body is read
  with read1() in chunks and abandoned as soon as it passes `max_bytes`.
- `on_headers(status, headers)` runs on every response (redirects included) before any body byte
  is read: the X-Robots-Tag check raises FetchFailure(OPT_OUT) there.
"""

from __future__ import annotations

import heapq
import http.client
import ipaddress
import itertools
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from typing import Optional
from urllib.parse import quote, urljoin, urlsplit

from curate.fetching.policy import AddressPolicy
from curate.schema import FetchStatus
from email.utils import parsedate_to_datetime

REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 256 * 1024
_SAFE_TARGET = "/:@!$&'()*+,;=?%~-._"


class FetchFailure(Exception):
    """One URL's final (or, if transient, retryable) outcome other than ok."""

    def __init__(self, status: FetchStatus, detail: str, retry_after: Optional[float] = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


@dataclass
class Fetched:
    url: str  # after redirects
    status: int
    headers: Message
    body: bytes
    hops: int


# --- the deadline watchdog --------------------------------------------------------------------------
class _Watch:
    __slots__ = ("sock", "fired", "live")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fired = False
        self.live = True


class Watchdog:
    """One daemon thread that shuts sockets down when their deadline passes."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, _Watch]] = []
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None

    def watch(self, sock: socket.socket, deadline: float) -> _Watch:
        w = _Watch(sock)
        with self._cv:
            heapq.heappush(self._heap, (deadline, next(self._seq), w))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="curate-fetch-watchdog", daemon=True)
                self._thread.start()
            self._cv.notify()
        return w

    def unwatch(self, w: _Watch) -> None:
        with self._cv:
            w.live = False
            w.sock = None  # type: ignore[assignment]

    def _run(self) -> None:
        with self._cv:
            while True:
                while self._heap and not self._heap[0][2].live:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cv.wait(5.0)
                    continue
                deadline, _, w = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
                heapq.heappop(self._heap)
                w.fired = True
                try:
                    w.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


WATCHDOG = Watchdog()


# --- connections that connect only to checked addresses ---------------------------------------------
def _checked_connect(
    policy: AddressPolicy, host: str, port: int, timeout: float, on_socket: Callable[[socket.socket], None]
) -> socket.socket:
    why = policy.hostname_refusal(host)
    if why:
        raise FetchFailure(FetchStatus.BLOCKED_ADDRESS, f"refused {host}: {why}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise FetchFailure(FetchStatus.CONNECTION_ERROR, f"cannot resolve {host!r}: {err}") from err
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        why = policy.refusal(ip)
        if why:
            raise FetchFailure(FetchStatus.BLOCKED_ADDRESS, f"refused {host} -> {ip}: {why}")
    last: Optional[BaseException] = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)  # the checked address itself, never the name again
            on_socket(sock)
            return sock
        except OSError as err:
            sock.close()
            last = err
    raise last if last else OSError(f"no address for {host!r}")


class _GuardedHTTP(http.client.HTTPConnection):
    def __init__(
        self, host: str, port: int, timeout: float, policy: AddressPolicy, on_socket: Callable[[socket.socket], None]
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self._create_connection = lambda addr, t, src=None: _checked_connect(policy, addr[0], addr[1], t, on_socket)


class _GuardedHTTPS(http.client.HTTPSConnection):
    def __init__(
        self,
        host: str,
        port: int,
        timeout: float,
        policy: AddressPolicy,
        on_socket: Callable[[socket.socket], None],
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._create_connection = lambda addr, t, src=None: _checked_connect(policy, addr[0], addr[1], t, on_socket)


# --- the client ---------------------------------------------------------------------------------
def _parse_retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def _target(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, request target) of an http(s) URL, or FetchFailure(BAD_URL)."""
    try:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchFailure(FetchStatus.BAD_URL, f"refused URL scheme {scheme!r}: only http and https are fetched")
        host = parts.hostname
        if not host:
            raise FetchFailure(FetchStatus.BAD_URL, "URL has no host")
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
        port = parts.port or (443 if scheme == "https" else 80)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        target = quote(target, safe=_SAFE_TARGET)
    except FetchFailure:
        raise
    except (ValueError, UnicodeError) as err:
        raise FetchFailure(FetchStatus.BAD_URL, f"invalid URL: {err}") from err
    if any(ord(c) < 33 for c in host + target):
        raise FetchFailure(FetchStatus.BAD_URL, "control character or space in URL")
    return scheme, host, port, target


class GuardedFetcher:
    def __init__(
        self,
        policy: AddressPolicy,
        timeout_s: float,
        max_bytes: int,
        max_redirects: int,
        user_agent: str,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        self.policy = policy
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.user_agent = user_agent
        self.ssl_context = ssl_context or ssl.create_default_context()

    def get(self, url: str, deadline: float, on_headers: Optional[Callable[[int, Message], None]] = None) -> Fetched:
        hops = 0
        while True:
            status, headers, body, location = self._one_hop(url, deadline, on_headers)
            if location is None:
                return Fetched(url, status, headers, body, hops)
            hops += 1
            if hops > self.max_redirects:
                raise FetchFailure(
                    FetchStatus.TOO_MANY_REDIRECTS,
                    f"more than {self.max_redirects} redirects (last to {location[:200]})",
                )
            url = urljoin(url, location)

    def _one_hop(
        self, url: str, deadline: float, on_headers: Optional[Callable[[int, Message], None]]
    ) -> tuple[int, Message, bytes, Optional[str]]:
        scheme, host, port, target = _target(url)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchFailure(FetchStatus.TIMEOUT, "deadline passed")
        watches: list = []

        def on_socket(sock: socket.socket) -> None:
            watches.append(WATCHDOG.watch(sock, deadline))

        timeout = min(self.timeout_s, remaining)
        if scheme == "https":
            conn: http.client.HTTPConnection = _GuardedHTTPS(
                host, port, timeout, self.policy, on_socket, self.ssl_context
            )
        else:
            conn = _GuardedHTTP(host, port, timeout, self.policy, on_socket)
        try:
            conn.putrequest("GET", target, skip_accept_encoding=True)
            conn.putheader("User-Agent", self.user_agent)
            conn.putheader("Accept", "image/*")
            conn.putheader("Accept-Encoding", "identity")
            conn.putheader("Connection", "close")
            conn.endheaders()
            resp = conn.getresponse()
            if on_headers is not None:
                on_headers(resp.status, resp.headers)
            if resp.status in REDIRECTS:
                location = resp.headers.get("Location")
                if not location:
                    raise FetchFailure(FetchStatus.TOO_MANY_REDIRECTS, f"HTTP {resp.status} without a Location header")
                return resp.status, resp.headers, b"", location
            if not 200 <= resp.status < 300:
                raise _http_failure(resp.status, resp.reason, resp.headers)
            return resp.status, resp.headers, self._read_body(resp, deadline, watches), None
        except FetchFailure:
            raise
        except (OSError, http.client.HTTPException) as err:
            if (watches and watches[0].fired) or time.monotonic() >= deadline:
                raise FetchFailure(FetchStatus.TIMEOUT, f"total deadline passed ({type(err).__name__})") from err
            if isinstance(err, (socket.timeout, TimeoutError)):
                raise FetchFailure(FetchStatus.TIMEOUT, f"no data for {self.timeout_s:g}s: {err}") from err
            if isinstance(err, ssl.SSLError):
                raise FetchFailure(FetchStatus.CONNECTION_ERROR, f"TLS: {err}") from err
            if isinstance(err, http.client.InvalidURL):
                raise FetchFailure(FetchStatus.BAD_URL, f"invalid URL: {err}") from err
            raise FetchFailure(FetchStatus.CONNECTION_ERROR, f"{type(err).__name__}: {err}") from err
        finally:
            for w in watches:
                WATCHDOG.unwatch(w)
            conn.close()

    def _read_body(self, resp: http.client.HTTPResponse, deadline: float, watches: list) -> bytes:
        length = resp.getheader("Content-Length")
        if length and length.strip().isdigit() and int(length) > self.max_bytes:
            raise FetchFailure(FetchStatus.TOO_LARGE, f"Content-Length {int(length)} > max_bytes {self.max_bytes}")
        buf = bytearray()
        while True:
            chunk = resp.read1(_CHUNK)
            if watches and watches[0].fired:  # the watchdog cut the socket: whatever we have is partial
                raise FetchFailure(FetchStatus.TIMEOUT, f"total deadline passed after {len(buf)} bytes")
            if not chunk:
                return bytes(buf)
            buf += chunk
            if len(buf) > self.max_bytes:
                raise FetchFailure(FetchStatus.TOO_LARGE, f"body longer than max_bytes {self.max_bytes}")
            if time.monotonic() >= deadline:
                raise FetchFailure(FetchStatus.TIMEOUT, f"total deadline passed after {len(buf)} bytes")


def _http_failure(code: int, reason: str, headers: Message) -> FetchFailure:
    detail = f"HTTP Error {code}: {reason}"
    retry_after = _parse_retry_after(headers.get("Retry-After"))
    if code == 429:
        return FetchFailure(FetchStatus.RATE_LIMITED, detail, retry_after)
    if code == 408:
        return FetchFailure(FetchStatus.TIMEOUT, detail)
    if 500 <= code < 600:
        return FetchFailure(FetchStatus.HTTP_5XX, detail, retry_after if code == 503 else None)
    return FetchFailure(FetchStatus.HTTP_4XX, detail if 400 <= code < 500 else f"unexpected {detail}")
