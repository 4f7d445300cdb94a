"""Hand-built safetensors files, so a header can lie about offsets, sizes, dtypes and shapes.

Layout: 8-byte little-endian header length, the JSON header
{"name": {"dtype", "shape", "data_offsets": [begin, end]}}, then the data bytes.
"""

from __future__ import annotations

import json
import struct


def build(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def split(blob: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8:8 + length]), blob[8 + length:]


def edit_header(blob: bytes, edit) -> bytes:
    """Re-serialise `blob` after `edit(header)` changed its header in place; the data is kept as is."""
    header, data = split(blob)
    edit(header)
    return build(header, data)


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")
