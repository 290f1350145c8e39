"""uvicorn's httptools protocol with limits on what a request may send before the app sees it.

llhttp buffers a header of any size, and uvicorn takes any number of them: a 200 MB header
grew an API process by 600 MB and stalled every request on its event loop. Here a request's
head (request line and headers) past MAX_HEAD_BYTES, or more than MAX_HEADERS headers, is
answered 431 at once, as JSON like every other error, and the connection closed; memory stays
bounded by the limit plus one socket read. uvicorn's own plain-text 400 for a request llhttp
cannot parse (a control character in a header) becomes JSON too.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 32 * 1024
MAX_HEADERS = 100


def _response(status: int, reason: str, error: str, detail: str) -> bytes:
    body = orjson.dumps({"error": error, "detail": detail})
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


TOO_LARGE = _response(
    431,
    "Request Header Fields Too Large",
    "header_fields_too_large",
    f"a request's headers may take at most {MAX_HEAD_BYTES} bytes and number at most {MAX_HEADERS}",
)


class BoundedHttpTools(HttpToolsProtocol):
    """Pass as `uvicorn.Config(http=BoundedHttpTools)`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # reading a request's head (a new connection's first request too)
        self._head_bytes = 0  # bytes read while in the head (the part not parsed yet included)
        self._parsed = 0  # of the head, as parsed
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self._in_head and not self._refused:
            # Still in a head after this read: all of it went there (or to the request before,
            # when pipelined: a slight overcount, never an undercount).
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse("head too large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._parsed = True, 0, 0

    def on_url(self, url: bytes) -> None:
        if not self._refused:
            super().on_url(url)
            self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        super().on_header(name, value)
        if len(self.headers) > MAX_HEADERS:
            self._refuse("too many headers")
        else:
            self._count(len(name) + len(value) + 4)  # ": " and CRLF

    def _count(self, size: int) -> None:
        """The head as parsed: a whole one that came in one read is measured too."""
        self._parsed += size
        if self._parsed > MAX_HEAD_BYTES:
            self._refuse("head too large")

    def on_headers_complete(self) -> None:
        self._in_head = False
        if not self._refused:
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self._refused:  # the parser gave up on what followed the refusal: answered already
            return
        self.transport.write(_response(400, "Bad Request", "bad_request", f"not a valid HTTP request: {msg}"))
        self.transport.close()

    def _refuse(self, why: str) -> None:
        self._refused = True
        log.warning("request refused: headers over the limits", extra={"why": why, "client": self.client})
        self.transport.write(TOO_LARGE)
        self.transport.close()
