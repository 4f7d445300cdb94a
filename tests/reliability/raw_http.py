"""Raw HTTP/1.1 over a socket, for what httpx will not do: announce a body and never send it,
or trickle bytes one at a time."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse


def connect(url: str, timeout: float) -> socket.socket:
    parsed = urlparse(url)
    return socket.create_connection((parsed.hostname, parsed.port), timeout=timeout)


def head_only(url: str, method: str, path: str, headers: dict[str, str], declared: int, sent: bytes,
              timeout: float) -> tuple[int | None, bytes, float]:
    """Send the request head announcing `declared` body bytes and only `sent` of them, then wait.

    Returns (status or None if no answer within `timeout`, the bytes received, seconds waited).
    A server that checks credentials before reading the body answers at once; one that reads the
    body first waits for bytes that never come.
    """
    started = time.monotonic()
    host = urlparse(url).netloc
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {declared}", "Connection: close",
             *(f"{k}: {v}" for k, v in headers.items())]
    with connect(url, timeout) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + sent)
        received = b""
        try:
            while b"\r\n\r\n" not in received:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
            received += _rest(sock)
        except (socket.timeout, ConnectionError):
            pass
    seconds = time.monotonic() - started
    status = int(received.split(b" ", 2)[1]) if received.startswith(b"HTTP/1.1 ") else None
    return status, received, seconds


def _rest(sock: socket.socket) -> bytes:
    sock.settimeout(1.0)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (socket.timeout, ConnectionError):
        pass
    return data
