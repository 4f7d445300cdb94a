"""The HTTP/1.1 protocol: uvicorn's httptools one (llhttp, in C), with a bound on request heads.

httptools parses a 200 MB upload's bytes with far less event-loop time than the pure-Python
h11, which keeps the loop free for other clients' requests and streams. It has no limit of
its own on the request line and headers, so this subclass counts the bytes received while a
request's head is incomplete and answers 431 (and closes) past `max_head_bytes`: a client
cannot grow the server's memory with an endless header.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = 64 * 1024

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = False
        self._head_bytes = 0

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._reading_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._reading_head and not self.transport.is_closing():
            # Counted after parsing: a read that completes the head (and carries body bytes) is not counted.
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse_head()

    def _refuse_head(self) -> None:
        body = json.dumps({"error": {
            "message": f"the request line and headers are larger than {self.max_head_bytes} bytes "
                       "(--max-header-bytes)",
            "type": "invalid_request_error", "param": None, "code": "headers_too_large"}}).encode()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.transport.close()
        self._reading_head = False


def bounded_protocol(max_head_bytes: int) -> type[BoundedHttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, with this server's head limit."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"max_head_bytes": max_head_bytes})
