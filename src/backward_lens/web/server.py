"""The viewer's HTTP server: standard library only (``http.server.ThreadingHTTPServer``).

Routes: ``GET /`` (the page, scripts inlined), ``GET /api/config``, ``GET /api/status``,
``POST /api/explain``, ``POST /api/cell``, ``POST /api/edit``. A user mistake is answered with
HTTP 400 and ``{"error": message}``, shown in the page. No route serves files: the page is built
in memory and models come only from the configured list.

When bound to a loopback address the server also checks the ``Host`` header (a web page on
another site cannot reach it through DNS rebinding) and requires JSON bodies on POST (a plain
cross-site form cannot post to it).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import sys
import time
import traceback
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from backward_lens.errors import BackwardLensError
from backward_lens.web.app import ViewerApp
from backward_lens.web.render import render_app_html

log = logging.getLogger("backward_lens.web")

CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
)


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: ViewerApp, quiet: bool = False) -> None:
        self.app = app
        self.quiet = quiet
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, ViewerHandler)

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), int(self.server_address[1])
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(str(self.server_address[0])).is_loopback
        except ValueError:
            return False


class ViewerHandler(BaseHTTPRequestHandler):
    server: ViewerServer
    server_version = "backward-lens"
    protocol_version = "HTTP/1.1"

    # -- plumbing -------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            sys.stderr.write(f"[serve] {self.address_string()} {format % args}\n")

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        body = json.dumps(data, ensure_ascii=False, allow_nan=False).encode()
        self._send(status, body, "application/json; charset=utf-8", {})

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _host_ok(self) -> bool:
        if not self.server.is_loopback():
            return True
        host = (self.headers.get("Host") or "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in ("localhost", "127.0.0.1", "[::1]") or name.startswith("127.")

    # -- routes ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
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
        return self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        app = self.server.app
        routes: dict[str, Callable[[Any], dict[str, Any]]] = {
            "/api/explain": app.explain,
            "/api/cell": app.cell,
            "/api/edit": app.edit,
        }
        path = self.path.split("?", 1)[0]
        if path not in routes:
            return self._error(HTTPStatus.NOT_FOUND, f"no such API: {path}")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return self._error(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the body as application/json"
            )
        try:
            length = int(self.headers.get("Content-Length") or "")
        except ValueError:
            return self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        limit = app.limits.max_body_bytes
        if length < 0 or length > limit:
            self.close_connection = True
            return self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request is {length} bytes; limit {limit}"
            )
        try:
            payload = json.loads(self.rfile.read(length) or b"null")
        except (ValueError, UnicodeDecodeError):
            return self._error(HTTPStatus.BAD_REQUEST, "the request body is not valid JSON")
        start = time.perf_counter()
        try:
            result = routes[path](payload)
        except BackwardLensError as exc:
            return self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except Exception as exc:  # a bug: keep the server up, tell the page, log the traceback
            traceback.print_exc()
            return self._error(
                HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({type(exc).__name__}: {exc})"
            )
        log.info("%s took %.2f s", path, time.perf_counter() - start)
        return self._json(HTTPStatus.OK, result)


def make_server(
    app: ViewerApp, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False
) -> ViewerServer:
    """Bind the server (``port=0`` picks a free port; see ``server.url``). Call serve_forever()."""
    return ViewerServer((host, port), app, quiet=quiet)
