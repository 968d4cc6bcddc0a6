"""The viewer's HTTP server: standard library only (``http.server``), hardened for a shared machine.

Routes: ``GET /`` (the page, scripts inlined), ``GET /api/config``, ``GET /api/status``,
``POST /api/explain``, ``POST /api/cell``, ``POST /api/edit``. A user mistake (a bad body, a
value out of range) is answered with HTTP 400 and ``{"error": message}``, shown in the page; an
unexpected exception with HTTP 500 and a generic message (the traceback goes to the log). No
route serves files: the page is built in memory and models come only from the configured list.
With ``serve --runs DIR``, ``GET /training/`` and ``GET /training/<run>`` show training-lens
reports built from the run folders found there, looked up by name only
(``backward_lens.training.viewer``).

Guarantees (see :class:`ServerOptions`; tested in ``tests/test_web_api.py`` and
``tests/test_web_load.py``):

- **Bounded threads and queue.** A fixed pool of ``workers`` threads handles connections; up to
  ``queue`` accepted connections wait for a free worker. Beyond that a connection is answered at
  once with HTTP 503, a JSON message and ``Retry-After``, and closed cleanly (the request is read
  and discarded, so the client sees the answer, not a reset). The listen backlog is ``backlog``.
- **Timeouts.** Every socket read or write waits at most ``timeout`` seconds, and a whole request
  (request line, headers, body) must arrive within ``request_deadline`` seconds, so half-open or
  trickling connections free their worker.
- **Loopback only by name.** When bound to a loopback address, the ``Host`` header must be a
  loopback IP literal (``127.0.0.1``, ``[::1]``, any ``127.x.y.z``), or ``localhost``, with an
  optional port: a DNS-rebinding page (``Host: 127.attacker.example``) is refused with 403.
- **Same-origin POSTs.** A POST carrying an ``Origin`` header must come from the page itself
  (``http://`` + the request's ``Host``), so no other site, and no other local port, can post;
  POSTs must also be ``application/json`` (a plain cross-site form cannot send that). A POST
  without ``Origin`` (curl, scripts) is allowed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import queue
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from backward_lens.errors import BackwardLensError
from backward_lens.io import dumps
from backward_lens.schema import ErrorReply
from backward_lens.web.app import ViewerApp
from backward_lens.web.render import render_app_html
from backward_lens.web.validation import parse_json_body

log = logging.getLogger("backward_lens.web")

CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
)

_LINGER_SECONDS = 2.0
"""How long a refused or errored connection is drained before it is closed (see _Housekeeper)."""
_MAX_LINGERING = 512
"""Refused connections drained at once; beyond this a refused connection is closed at once."""


@dataclass(frozen=True)
class ServerOptions:
    """Capacity and timeouts of the server (the defaults serve 50 concurrent clients, no 503).

    Attributes:
        workers: connections handled at once (threads; requests on one model still run one at
            a time, under the model's lock).
        queue: accepted connections waiting for a free worker; one more gets HTTP 503.
        timeout: seconds any single socket read or write may wait (an idle keep-alive
            connection is closed after this long).
        request_deadline: seconds to receive one whole request (line, headers and body).
        backlog: the listen backlog (connections the kernel holds before ``accept``).
        retry_after: seconds, sent in ``Retry-After`` with a 503.
    """

    workers: int = 16
    queue: int = 64
    timeout: float = 10.0
    request_deadline: float = 30.0
    backlog: int = 128
    retry_after: int = 2

    def __post_init__(self) -> None:
        """Refuse a capacity or timeout that cannot work (ValueError)."""
        if self.workers < 1 or self.queue < 0 or self.backlog < 1:
            raise ValueError("workers and backlog must be at least 1, queue at least 0")
        if not (self.timeout > 0 and self.request_deadline > 0 and self.retry_after >= 0):
            raise ValueError("timeout and request_deadline must be positive, retry_after >= 0")


@dataclass
class ServerStats:
    """Counters for tests and the log (read them while the server runs)."""

    active: int = 0
    """Connections a worker is handling now."""
    peak_active: int = 0
    accepted: int = 0
    rejected: int = 0
    """Connections answered with 503 because the queue was full."""
    timed_out: int = 0
    """Connections closed because a request did not arrive within ``request_deadline``."""
    errors: int = 0
    """Requests answered with 500 (an unexpected exception, logged)."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (and track ``peak_active``), under the lock."""
        with self.lock:
            setattr(self, name, getattr(self, name) + n)
            if name == "active":
                self.peak_active = max(self.peak_active, self.active)


def _json_bytes(data: Any) -> bytes:
    """A reply body: ``data`` (a dict or a ``backward_lens.schema`` reply model) as UTF-8 JSON.

    Written by the one serialiser (``io.dumps``): NaN and infinities become ``null``, which
    ``JSON.parse`` in the page can read.
    """
    return dumps(data).encode()


# -- Host and Origin ----------------------------------------------------------------------------


def split_authority(value: str) -> tuple[str, int | None] | None:
    """``host[:port]`` (a ``Host`` header, an origin's authority) as (host, port), or None.

    IPv6 literals must be in brackets and are returned without them, in compressed form
    (``[0:0::1]`` gives ``::1``); names are lower-cased. A malformed value gives None.
    """
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[1:end], value[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            return None
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            return None
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text_raw = value.partition(":")
        port_text = port_text_raw if sep else None
        if not host or ":" in port_text_raw:
            return None
    if port_text is None:
        return host, None
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return host, int(port_text)


def is_loopback_name(host: str) -> bool:
    """``localhost``, or an IP literal of the loopback network (no other name resolves safely).

    ``host`` as :func:`split_authority` returns it (IPv6 without brackets). Names such as
    ``127.attacker.example`` or ``localhost.example`` are refused: their address is whatever
    their DNS says, which is what a rebinding attack controls.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def origin_authority(origin: str) -> tuple[str, int] | None:
    """An ``Origin`` header's (host, port) for ``http://`` origins (port 80 if absent), or None."""
    if not origin.startswith("http://"):
        return None  # "null", https://, file://: never this server's page
    rest = origin[len("http://") :]
    if "/" in rest or "@" in rest:
        return None
    parsed = split_authority(rest)
    if parsed is None:
        return None
    return parsed[0], parsed[1] or 80


# -- the server ---------------------------------------------------------------------------------


class _Housekeeper:
    """One thread that drains refused connections and enforces the request deadline.

    A connection closed while the client's request is still unread makes the kernel send a reset,
    which the client sees instead of our answer. So a refused connection is answered, shut for
    writing, and read until the client closes (or ``_LINGER_SECONDS``) before it is closed.
    Connections reading a request are "armed" with a deadline; when it passes, their socket is
    shut down, which wakes the worker blocked in ``recv``.
    """

    def __init__(self, stats: ServerStats, name: str) -> None:
        self.stats = stats
        self._incoming: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        self._armed: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lingering = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def linger(self, sock: socket.socket) -> None:
        """Drain and close ``sock`` (already answered) in the background."""
        with self._lock:
            full = self._lingering >= _MAX_LINGERING or self._stop.is_set()
            if not full:
                self._lingering += 1
        if full:
            _close(sock)
            return
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
        except OSError:
            with self._lock:
                self._lingering -= 1
            _close(sock)
            return
        self._incoming.put(sock)

    def arm(self, sock: socket.socket, deadline: float) -> None:
        """Shut ``sock`` down once ``deadline`` (``time.monotonic()`` seconds) passes."""
        with self._lock:
            self._armed[sock] = deadline

    def disarm(self, sock: socket.socket) -> None:
        """Cancel ``sock``'s deadline (its request arrived, or the connection ended)."""
        with self._lock:
            self._armed.pop(sock, None)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the housekeeping thread and wait for it (at most ``timeout`` seconds)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        until: dict[socket.socket, float] = {}
        while not self._stop.is_set():
            while True:
                try:
                    sock = self._incoming.get_nowait()
                except queue.Empty:
                    break
                until[sock] = time.monotonic() + _LINGER_SECONDS
                selector.register(sock, selectors.EVENT_READ)
            for key, _ in selector.select(timeout=0.05) if until else ():
                sock = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    until[sock] = 0.0
            if not until:
                self._stop.wait(0.05)
            now = time.monotonic()
            for sock in [s for s, t in until.items() if t <= now]:
                selector.unregister(sock)
                del until[sock]
                _close(sock)
                with self._lock:
                    self._lingering -= 1
            with self._lock:
                expired = [s for s, t in self._armed.items() if t <= now]
                for sock in expired:
                    del self._armed[sock]
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            if expired:
                self.stats.add("timed_out", len(expired))
        for sock in until:
            _close(sock)
        selector.close()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


class ViewerServer(HTTPServer):
    """The viewer's HTTP server: a bounded worker pool over ``http.server.HTTPServer``.

    Use :func:`make_server`. ``serve_forever()`` accepts connections and hands them to the
    workers; ``shutdown()`` then ``server_close()`` stop it.

    Args:
        address: ``(host, port)`` to bind (an IPv6 host gets an IPv6 socket).
        app: the request logic.
        quiet: do not log each request.
        options: capacity and timeouts (default :class:`ServerOptions`).
    """

    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        app: ViewerApp,
        quiet: bool = False,
        options: ServerOptions | None = None,
    ) -> None:
        """Bind ``address`` (IPv6 when the host has a colon) and prepare the worker pool."""
        self.app = app
        self.quiet = quiet
        self.options = options or ServerOptions()
        self.request_queue_size = self.options.backlog
        self.stats = ServerStats()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, ViewerHandler)
        self._loopback = _is_loopback_address(str(self.server_address[0]))
        self._queue: queue.Queue[tuple[socket.socket, Any] | None] = queue.Queue(
            maxsize=self.options.queue
        )
        port = int(self.server_address[1])
        self.housekeeper = _Housekeeper(self.stats, name=f"viewer:{port}:housekeeper")
        busy = ErrorReply(
            error="the viewer is busy with other requests; try again in a few seconds",
            retry_after=self.options.retry_after,
        )
        body = _json_bytes(busy)
        self._busy_response = (
            "HTTP/1.1 503 Service Unavailable\r\n"
            "Content-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Retry-After: {self.options.retry_after}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        ).encode() + body
        self._workers = [
            threading.Thread(target=self._work, name=f"viewer:{port}:worker-{i}", daemon=True)
            for i in range(self.options.workers)
        ]
        for t in self._workers:
            t.start()

    @property
    def url(self) -> str:
        """The address to open in a browser (``http://host:port/``)."""
        host, port = str(self.server_address[0]), int(self.server_address[1])
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def is_loopback(self) -> bool:
        """Whether the server is bound to a loopback address (the Host checks are on)."""
        return self._loopback

    def threads(self) -> list[threading.Thread]:
        """This server's live threads (workers and the housekeeper; the accept loop is yours)."""
        prefix = f"viewer:{int(self.server_address[1])}:"
        return [t for t in threading.enumerate() if t.name.startswith(prefix)]

    @property
    def queued(self) -> int:
        """Connections accepted and waiting for a worker."""
        return self._queue.qsize()

    # -- connection handling (socketserver hooks) ----------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        """Queue the connection for a worker, or answer 503 at once when the queue is full."""
        self.stats.add("accepted")
        try:
            self._queue.put_nowait((request, client_address))
        except queue.Full:
            self.stats.add("rejected")
            log.warning("busy: refused a connection from %s with 503", client_address[0])
            try:
                request.setblocking(False)
                request.send(self._busy_response)  # ~200 bytes: fits the empty send buffer
            except OSError:
                pass
            self.housekeeper.linger(request)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            request, client_address = item
            self.stats.add("active")
            try:
                request.settimeout(self.options.timeout)
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.housekeeper.disarm(request)
                self.stats.add("active", -1)
                self.housekeeper.linger(request)  # drain what an early answer left unread

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a connection's failure: a client that left at debug level, anything else loudly."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, TimeoutError)):  # the client went away or stalled
            log.debug("connection from %s ended: %r", client_address[0], exc)
        else:
            log.exception("unexpected error on a connection from %s", client_address[0])

    def server_close(self) -> None:
        """Close the listening socket, drop queued connections, stop the workers when idle."""
        super().server_close()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                _close(item[0])
        for _ in self._workers:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
        # Wait for the workers (each finishes its request, then takes its None) and the
        # housekeeper: daemon threads still running at interpreter exit can abort the process.
        deadline = time.monotonic() + self.options.timeout
        for t in self._workers:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        self.housekeeper.stop()


def _is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class ViewerHandler(BaseHTTPRequestHandler):
    """One connection: parses requests, checks Host/Origin, routes to :class:`ViewerApp`."""

    server: ViewerServer
    server_version = "backward-lens"
    protocol_version = "HTTP/1.1"

    # -- plumbing -------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        """One line per request on stderr, unless the server is quiet."""
        if not self.server.quiet:
            sys.stderr.write(f"[serve] {self.address_string()} {format % args}\n")

    def handle_one_request(self) -> None:
        """One request, which must arrive whole within ``request_deadline`` seconds."""
        self._responded = False
        deadline = time.monotonic() + self.server.options.request_deadline
        self.server.housekeeper.arm(self.connection, deadline)
        try:
            super().handle_one_request()
        finally:
            self.server.housekeeper.disarm(self.connection)

    def _received(self) -> None:
        """The whole request is in: from now on only ``timeout`` applies (the work may be long)."""
        self.server.housekeeper.disarm(self.connection)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str]) -> None:
        self._responded = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in extra.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, _json_bytes(data), "application/json; charset=utf-8", {})

    def _error(self, status: int, message: str) -> None:
        self._json(status, ErrorReply(error=message))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found by ``http.server`` itself (bad request line, headers...) as JSON too."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._error(code, message or phrase)

    def _guarded(self, route: Callable[[], None]) -> None:
        """Run a route: user errors to 400, anything unexpected to a logged, generic 500."""
        try:
            route()
        except BackwardLensError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client went away or stalled: nobody to answer
        except Exception:
            self.server.stats.add("errors")
            log.exception("%s %s failed", self.command, self.path)
            if self._responded:  # a partial answer went out: the connection is unusable
                self.close_connection = True
                return
            self.close_connection = True
            self._error(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                "internal error: the request failed; the server log has the details",
            )

    def _host_ok(self) -> bool:
        if not self.server.is_loopback():
            return True
        parsed = split_authority(self.headers.get("Host") or "")
        return parsed is not None and is_loopback_name(parsed[0])

    def _origin_ok(self) -> bool:
        """A POST's ``Origin``, when present, must be this page: ``http://`` + the Host."""
        origin = self.headers.get("Origin")
        if origin is None:
            return True
        theirs = origin_authority(origin.strip().lower())
        host = split_authority(self.headers.get("Host") or "")
        if theirs is None or host is None:
            return False
        if self.server.is_loopback() and not is_loopback_name(theirs[0]):
            return False
        return theirs == (host[0], host[1] or 80)

    # -- routes ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
        """The page, ``/api/config``, ``/api/status`` and the training reports."""
        self._received()
        self._guarded(self._get)

    def do_HEAD(self) -> None:
        """As GET, without the body."""
        self.do_GET()

    def do_POST(self) -> None:
        """``/api/explain``, ``/api/cell`` and ``/api/edit`` (JSON bodies, same origin only)."""
        self._guarded(self._post)

    def _get(self) -> None:
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        path = self.path.split("?", 1)[0]
        app = self.server.app
        if path in ("/", "/index.html"):
            page = render_app_html(app.config()).encode()
            return self._send(
                HTTPStatus.OK, page, "text/html; charset=utf-8", {"Content-Security-Policy": CSP}
            )
        if path == "/api/config":
            return self._json(HTTPStatus.OK, app.config())
        if path == "/api/status":
            return self._json(HTTPStatus.OK, app.status())
        if path == "/favicon.ico":
            return self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon", {})
        if app.runs is not None and (path == "/training" or path.startswith("/training/")):
            status, text = app.runs.page(path)  # read-only training-lens reports
            return self._send(
                status, text.encode(), "text/html; charset=utf-8", {"Content-Security-Policy": CSP}
            )
        return self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    def _refuse_unread(self, status: int, message: str) -> None:
        """Answer before reading the body: close, and drain what the client still sends."""
        self.close_connection = True
        self._received()
        self._error(status, message)

    def _post(self) -> None:
        if not self._host_ok():
            return self._refuse_unread(HTTPStatus.FORBIDDEN, "unexpected Host header")
        if not self._origin_ok():
            return self._refuse_unread(
                HTTPStatus.FORBIDDEN,
                "cross-origin request refused: post from the viewer's own page",
            )
        app = self.server.app
        routes: dict[str, Callable[[Any], Any]] = {
            "/api/explain": app.explain,
            "/api/cell": app.cell,
            "/api/edit": app.edit,
        }
        path = self.path.split("?", 1)[0]
        if path not in routes:
            return self._refuse_unread(HTTPStatus.NOT_FOUND, f"no such API: {path}")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return self._refuse_unread(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the body as application/json"
            )
        try:
            length = int(self.headers.get("Content-Length") or "")
        except ValueError:
            return self._refuse_unread(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        limit = app.limits.max_body_bytes
        if length < 0 or length > limit:
            return self._refuse_unread(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request is {length} bytes; limit {limit}"
            )
        raw = self.rfile.read(length)
        self._received()
        if len(raw) < length:
            self.close_connection = True
            return  # the client closed (or the deadline cut it) before sending the whole body
        payload = parse_json_body(raw, app.limits.max_json_depth)
        start = time.perf_counter()
        result = routes[path](payload)
        log.info("%s took %.2f s", path, time.perf_counter() - start)
        return self._json(HTTPStatus.OK, result)


def make_server(
    app: ViewerApp,
    host: str = "127.0.0.1",
    port: int = 8000,
    quiet: bool = False,
    options: ServerOptions | None = None,
) -> ViewerServer:
    """Bind the server (``port=0`` picks a free port; see ``server.url``). Call serve_forever().

    Args:
        app: the request logic and its models.
        host: the address to listen on; a loopback host also turns on the Host checks.
        port: the port (0: any free one).
        quiet: do not log each request to stderr.
        options: capacity and timeouts (:class:`ServerOptions`; the defaults suit one user).

    Raises:
        OSError: the address cannot be bound (in use, not local).
    """
    return ViewerServer((host, port), app, quiet=quiet, options=options)
