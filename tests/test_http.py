"""The API on a real uvicorn server (api/http_limits.py's protocol, as the API actors run it),
spoken to over raw sockets: what an HTTP client library would not send, this test does: raw
header bytes, headers past the limits, control characters, a body cut short."""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import threading
import time
from collections.abc import Iterator

import orjson
import psutil
import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.app import create_app
from api.http_limits import MAX_HEADERS, BoundedHttpTools
from api.metrics import ApiMetrics
from system.core.catalog import Catalog
from system.core.catalog_file import SHIPPED, read_movies
from tests.fakes import FakeBackend

TOKEN = "s3cret-admin-token-of-some-length"


class Server:
    def __init__(self) -> None:
        self.backend = FakeBackend(Catalog.from_movies(list(read_movies(SHIPPED))))
        self.metrics = ApiMetrics()
        app = create_app(self.backend, self.metrics, admin_token=TOKEN)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", http=BoundedHttpTools)
        self.uvicorn = uvicorn.Server(config)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=lambda: asyncio.run(self.uvicorn.serve(sockets=[self.sock])), daemon=True)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def exchange(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send `request` (a whole HTTP/1.1 request, `Connection: close`), read the answer."""
        with self.connect() as conn:
            conn.sendall(request)
            return read_response(conn)

    def statuses(self) -> dict[int, float]:
        """Requests by status, as the app's metrics counted them."""
        counts: dict[int, float] = {}
        for family in self.metrics.requests.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    status = int(sample.labels["status"])
                    counts[status] = counts.get(status, 0) + sample.value
        return counts


def read_response(conn: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"the server closed without an answer: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = conn.recv(65536)
        assert chunk, "the body was cut short"
        body += chunk
    return int(status_line.split()[1]), headers, body


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    running = Server()
    running.thread.start()
    deadline = time.monotonic() + 10
    while not running.uvicorn.started:
        assert time.monotonic() < deadline and running.thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    yield running
    running.uvicorn.should_exit = True
    running.thread.join(10)
    running.sock.close()


def get(path: str, *headers: bytes) -> bytes:
    return b"\r\n".join([f"GET {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", *headers, b"Connection: close", b"", b""])


def test_a_uxid_header_is_read_as_utf8_and_latin1_bytes_are_refused(server: Server) -> None:
    status, _, _ = server.exchange(get("/api/movies/5", "uxid: café".encode()))
    assert status == 200
    assert server.backend.published[-1].user == "café"  # not "cafÃ©": the same user as in events
    status, _, body = server.exchange(get("/api/recommendations/movies", "uxid: 🎬 fan".encode()))
    assert status == 200 and server.backend.published[-1].user == "🎬 fan"
    status, headers, body = server.exchange(get("/api/recommendations/movies", b"uxid: caf\xe9"))
    assert status == 400 and headers["content-type"] == "application/json"
    assert "UTF-8" in orjson.loads(body)["detail"]


def test_a_huge_header_is_refused_at_the_limit_without_being_read(server: Server) -> None:
    rss = psutil.Process().memory_info().rss
    sent = 0
    with server.connect() as conn:
        conn.sendall(b"GET /api/movies HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        chunk = b"a" * 65536
        try:
            while sent < 200 * 2**20:  # 200 MB, unless the server answers first
                conn.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, headers, body = read_response(conn)
    assert status == 431 and headers["content-type"] == "application/json", body
    assert orjson.loads(body)["error"] == "header_fields_too_large"
    # Refused near the limit, not after 200 MB (what was sent meanwhile sat in socket buffers).
    assert sent < 32 * 2**20
    assert psutil.Process().memory_info().rss - rss < 64 * 2**20


def test_a_whole_request_with_a_large_header_is_refused_too(server: Server) -> None:
    """The request in one piece (one read on the server): its head is measured as parsed."""
    status, _, body = server.exchange(get("/healthz", b"X-Big: " + b"a" * 100_000))
    assert status == 431 and orjson.loads(body)["error"] == "header_fields_too_large"
    assert server.exchange(get("/healthz", b"X-Fine: " + b"a" * 16_000))[0] == 200


def test_too_many_headers_are_refused(server: Server) -> None:
    many = [f"X-H{i}: {i}".encode() for i in range(MAX_HEADERS + 1)]
    status, _, body = server.exchange(get("/api/movies", *many))
    assert status == 431 and "header" in orjson.loads(body)["detail"]
    fine = [f"X-H{i}: {i}".encode() for i in range(MAX_HEADERS - 5)]
    assert server.exchange(get("/api/movies", *fine))[0] == 200


def test_a_control_character_in_a_header_is_a_json_400(server: Server) -> None:
    status, headers, body = server.exchange(get("/api/movies", b"uxid: a\x01b"))
    assert status == 400 and headers["content-type"] == "application/json"
    assert orjson.loads(body)["error"] == "bad_request"


def test_a_client_that_disconnects_mid_body_is_not_a_server_error(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    before, published = server.statuses(), len(server.backend.published)
    with server.connect() as conn:
        head = b"POST /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n"
        conn.sendall(head + b'[{"event_type": "clicked",')  # and hang up
    deadline = time.monotonic() + 10
    while server.statuses().get(499, 0) == before.get(499, 0):
        assert time.monotonic() < deadline, f"the cut request was never counted: {server.statuses()}"
        time.sleep(0.02)
    assert server.statuses().get(500, 0) == before.get(500, 0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(server.backend.published) == published


def test_the_private_uvicorn_interface_the_limits_subclass_is_as_checked() -> None:
    """api/http_limits.py subclasses uvicorn's private HttpToolsProtocol (no public hook bounds a
    request's head before it is read). pyproject pins the minor version it was checked against;
    if a later one moves what the subclass relies on, this says what, before any request does."""
    assert uvicorn.__version__.split(".")[:2] == ["0", "55"], (
        f"re-check api/http_limits.py against {uvicorn.__version__}"
    )
    for name in (
        "__init__",
        "data_received",
        "on_message_begin",
        "on_url",
        "on_header",
        "on_headers_complete",
        "on_body",
        "on_message_complete",
        "send_400_response",
    ):
        theirs = getattr(HttpToolsProtocol, name, None)
        assert theirs is not None, f"HttpToolsProtocol.{name} is gone"
        if name != "__init__":  # ours passes *args, **kwargs on
            ours = inspect.signature(getattr(BoundedHttpTools, name)).parameters
            assert list(ours) == list(inspect.signature(theirs).parameters), name
    source = inspect.getsource(HttpToolsProtocol)
    for used in ("self.headers", "self.transport", "self.client"):
        assert used in source, f"HttpToolsProtocol no longer has {used}"
