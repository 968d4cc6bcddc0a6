"""The viewer under load and under hostile connections (issue 10, "Viewer").

Guarantees checked here (``backward_lens.web.server``): every connection is answered, with the
result or a clear 503 (JSON message, ``Retry-After``) once the bounded queue is full, never a
reset; the server's threads stay at ``workers`` + 1 whatever the number of clients; half-open and
trickling connections are closed after ``timeout`` / ``request_deadline`` and free their worker;
and the model's weights are bit-identical after concurrent explains and edits.

The fast tests use a tiny random Llama with small ``ServerOptions``; the slow one starts the real
server with its default options on 127.0.0.1 with SmolLM2-135M and 50 concurrent clients.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from backward_lens.models import LensModel
from backward_lens.web import app as app_module
from backward_lens.web.app import ViewerApp
from backward_lens.web.pool import ModelPool, ModelSlot
from backward_lens.web.server import ServerOptions, ViewerServer, make_server
from tests.tiny import make_tiny

PROMPT = "The Eiffel Tower is located in the city of"
TARGET = " Rome"


@pytest.fixture(scope="module")
def tiny(tokenizer: Any) -> LensModel:
    return make_tiny("llama", tokenizer, seed=5)


@contextmanager
def running(lm: LensModel, options: ServerOptions | None = None) -> Iterator[ViewerServer]:
    """The real server on 127.0.0.1 (a free port) for one model, stopped afterwards."""
    app = ViewerApp(ModelPool([ModelSlot(lm.name, lambda: lm, lm)]))
    server = make_server(app, "127.0.0.1", 0, quiet=True, options=options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def weights_hash(lm: LensModel) -> str:
    """SHA-256 over every state_dict tensor's name and bytes (bit-for-bit identity)."""
    h = hashlib.sha256()
    for name, tensor in sorted(lm.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def post(
    server: ViewerServer, path: str, body: dict[str, Any], timeout: float = 60
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON) of one POST on a fresh connection, as the page sends it."""
    host, port = str(server.server_address[0]), int(server.server_address[1])
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = json.dumps(body).encode()
        conn.request("POST", path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.headers), json.loads(resp.read())
    finally:
        conn.close()


def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.01)


def open_half(server: ViewerServer, first_bytes: bytes = b"") -> socket.socket:
    """A connection that sends ``first_bytes`` (maybe nothing) and then stalls."""
    address = (str(server.server_address[0]), int(server.server_address[1]))
    sock = socket.create_connection(address, timeout=30)
    if first_bytes:
        sock.sendall(first_bytes)
    return sock


def closed_by_server(sock: socket.socket, within: float) -> float:
    """Seconds until the server closes ``sock`` (reads until EOF; 503 bytes may come first)."""
    start = time.monotonic()
    sock.settimeout(within)
    while sock.recv(65536):
        pass
    return time.monotonic() - start


def concurrent(n: int, job: Callable[[int], Any]) -> list[Any]:
    """Run ``job(i)`` for i < n in n threads released together; each result or the exception."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = job(i)
        except Exception as exc:  # a reset, a timeout: recorded, asserted on below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def mixed_request(i: int) -> tuple[str, dict[str, Any]]:
    """Request i of a mixed load: explains (new and reused captures) and edits."""
    if i % 2:
        return "/api/edit", {"prompt": PROMPT, "target": TARGET, "layer": 1, "eta": 1.0}
    return "/api/explain", {
        "prompt": PROMPT if i % 4 else f"{PROMPT} {i}",
        "target": TARGET,
        "top_k": 1 + i % 3,
        "session": f"s{i % 8}",
    }


# -- fast tests (tiny model) --------------------------------------------------------------------


def test_half_open_connections_are_timed_out_and_free_their_worker(tiny: LensModel) -> None:
    options = ServerOptions(workers=2, queue=4, timeout=1.0, request_deadline=2.0)
    with running(tiny, options) as server:
        silent = open_half(server)  # connects, sends nothing
        partial = open_half(server, b"POST /api/edit HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        wait_until(lambda: server.stats.active == 2)
        # Both workers are held; a real request waits in the queue and is served once they go.
        start = time.monotonic()
        status, _, _ = post(server, "/api/explain", {"prompt": PROMPT, "target": TARGET})
        assert status == 200
        assert time.monotonic() - start < 5
        assert closed_by_server(silent, within=5) < 5
        assert closed_by_server(partial, within=5) < 5
        # A client trickling a byte every 0.2 s never trips the 1 s read timeout, but the
        # whole-request deadline (2 s) closes it.
        trickle = open_half(server)
        start = time.monotonic()
        with pytest.raises(OSError):  # the server shut the connection while we still wrote
            for byte in b"GET /api/config HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
                trickle.sendall(bytes([byte]))
                time.sleep(0.2)
            raise AssertionError("the trickling connection was never closed")
        assert 1.5 < time.monotonic() - start < 8
        assert server.stats.timed_out >= 1
        for sock in (silent, partial, trickle):
            sock.close()
        assert post(server, "/api/explain", {"prompt": PROMPT, "target": TARGET})[0] == 200


def test_200_half_open_connections_hold_no_more_threads(tiny: LensModel) -> None:
    # The timeout outlasts opening the 200 connections, so exactly workers + queue are held.
    options = ServerOptions(workers=4, queue=4, timeout=2.0, request_deadline=3.0)
    with running(tiny, options) as server:
        threads = len(server.threads())
        assert threads == options.workers + 1  # the workers and the housekeeper
        socks = [open_half(server) for _ in range(200)]
        wait_until(lambda: server.stats.accepted >= 200)
        assert len(server.threads()) == threads
        assert server.stats.peak_active <= options.workers
        # Every one of them is closed by the server: 8 after the timeout, the rest with a 503.
        for sock in socks:
            closed_by_server(sock, within=10)
            sock.close()
        assert server.stats.rejected == 200 - options.workers - options.queue
        assert post(server, "/api/explain", {"prompt": PROMPT, "target": TARGET})[0] == 200
        assert len(server.threads()) == threads


def test_beyond_the_queue_a_clear_503(tiny: LensModel) -> None:
    options = ServerOptions(workers=1, queue=1, timeout=10, request_deadline=10, retry_after=3)
    with running(tiny, options) as server:
        holder = open_half(server)
        wait_until(lambda: server.stats.active == 1)
        waiting = open_half(server)
        wait_until(lambda: server.queued == 1)
        status, headers, out = post(server, "/api/explain", {"prompt": PROMPT, "target": TARGET})
        assert status == 503
        assert headers["Retry-After"] == "3"
        assert headers["Content-Type"] == "application/json; charset=utf-8"
        assert "busy" in out["error"] and "try again" in out["error"]
        assert server.stats.rejected == 1
        holder.close()
        waiting.close()
        wait_until(lambda: server.stats.active == 0 and server.queued == 0)
        assert post(server, "/api/explain", {"prompt": PROMPT, "target": TARGET})[0] == 200


def test_many_clients_on_a_small_queue_get_200_or_503_never_a_reset(
    tiny: LensModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = app_module.capture_requests

    def slow_capture(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.05)  # keep the workers busy so that the queue fills
        return real(*args, **kwargs)

    monkeypatch.setattr(app_module, "capture_requests", slow_capture)
    before = weights_hash(tiny)
    options = ServerOptions(workers=2, queue=3)
    with running(tiny, options) as server:

        def job(i: int) -> tuple[int, str, Any]:
            path, body = mixed_request(i)
            body["prompt"] = f"{PROMPT} {i}"  # a new capture each time
            status, headers, out = post(server, path, body)
            return status, headers.get("Retry-After", ""), out

        results = concurrent(60, job)
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors  # no reset, no timeout: every client got an HTTP answer
        statuses = [r[0] for r in results]
        assert set(statuses) == {200, 503}, statuses
        for status, retry_after, out in results:
            if status == 503:
                assert retry_after == "2" and "busy" in out["error"]
        assert statuses.count(503) == server.stats.rejected
        assert server.stats.peak_active <= options.workers
        assert len(server.threads()) == options.workers + 1
    assert weights_hash(tiny) == before


def test_deeply_nested_json_is_a_400_not_a_dropped_connection(tiny: LensModel) -> None:
    with running(tiny) as server:
        host, port = str(server.server_address[0]), int(server.server_address[1])
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("POST", "/api/explain", b"[" * 60000, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 400
        assert "nested more than" in json.loads(resp.read())["error"]
        conn.close()
        assert server.stats.errors == 0


# -- the load test (real model) -----------------------------------------------------------------


@pytest.mark.slow
def test_50_concurrent_mixed_requests_on_the_real_model(smollm2: LensModel) -> None:
    """50 clients at once, explains and edits, default options: all answered, bounded.

    The weights are bit-identical afterwards.
    """
    before = weights_hash(smollm2)
    options = ServerOptions()
    assert options.workers + options.queue >= 50  # so every one of the 50 is served (no 503)
    peak_threads = [0]
    with running(smollm2) as server:
        threads = len(server.threads())

        def job(i: int) -> tuple[int, Any]:
            path, body = mixed_request(i)
            body["prompt"] = "Paris is the capital of" if i % 4 else f"Rome is in {i}"
            body["target"] = " France"
            body.pop("layer", None)  # edits use the model's default layer and eta
            body.pop("eta", None)
            status, _, out = post(server, path, body, timeout=1800)
            peak_threads[0] = max(peak_threads[0], len(server.threads()))
            return status, out

        results = concurrent(50, job)
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors
        assert [r[0] for r in results] == [200] * 50, [r[1] for r in results if r[0] != 200]
        assert server.stats.rejected == 0 and server.stats.errors == 0
        assert server.stats.peak_active <= options.workers
        assert peak_threads[0] == threads == options.workers + 1
        edits = [r[1] for i, r in enumerate(results) if i % 2]
        assert all(e["reverted"] and e["rows"][0]["after"] for e in edits)
    assert weights_hash(smollm2) == before
