"""Adapter uploads: a bounded, streaming multipart reader and the checks made before the engine's.

The body is read chunk by chunk with a running count and refused (413) the moment it
passes the limit, so an oversized upload is never held in memory; a declared
Content-Length above the limit is refused before any of it is read. Accepted parts:
the fields `name` and `overwrite`, and either the files `adapter_config.json` +
`adapter_model.safetensors` or one `archive` (.zip, .tar, .tar.gz). A file part is
identified by its field name, or by its file name when the field name is not one of
those. Pickle weights are refused by name and by content and never unpickled.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

from fastapi import Request
from starlette.requests import ClientDisconnect
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from server.api.archives import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE, pickle_message, read_archive
from server.api.errors import ApiError

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
FILE_KEYS = (CONFIG_FILE, WEIGHTS_FILE, "archive")
FIELD_KEYS = ("name", "overwrite")
MAX_FIELD_BYTES = 1024
MULTIPART_SLACK = 64 * 1024       # boundaries, part headers and the small fields
DRAIN_LIMIT = 64 * 2**20          # read (and drop) at most this much of a refused body, so clients see the answer


@dataclass
class Upload:
    name: str
    overwrite: bool
    config: bytes
    weights: bytes


def validate_name(name: str, base_name: str, param: str = "name") -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ApiError(400, f"invalid adapter name {name[:80]!r}: use 1 to 64 characters from "
                            "A-Z a-z 0-9 . _ -", code="invalid_adapter_name", param=param)
    if name.startswith("."):
        raise ApiError(400, f"invalid adapter name {name!r}: it must not start with '.'",
                       code="invalid_adapter_name", param=param)
    if name.casefold() == base_name.casefold():
        raise ApiError(400, f"invalid adapter name {name!r}: it is the base model's name",
                       code="invalid_adapter_name", param=param)
    return name


def parse_bool(value: str, param: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off", ""):
        return False
    raise ApiError(400, f"{param} must be true or false, not {value[:20]!r}", code="invalid_value", param=param)


def check_safetensors(data: bytes, what: str) -> None:
    """Refuse a pickle or torch.save zip posing as safetensors; everything else is the engine's to validate."""
    if len(data) > 8 and data[8:9] == b"{":
        return
    if data[:4] == b"PK\x03\x04" or (len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5):
        raise ApiError(400, pickle_message(what), code="invalid_adapter", param=WEIGHTS_FILE)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the upload is larger than the limit of {limit} bytes (--max-adapter-bytes)",
                    code="adapter_too_large")


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    key: str = ""
    is_file: bool = False
    data: bytearray = field(default_factory=bytearray)


class MultipartReader:
    """Callbacks for python-multipart that keep the upload within `limit` bytes of file data."""

    def __init__(self, limit: int, base_name: str) -> None:
        self.limit, self.base_name = limit, base_name
        self.file_bytes = 0
        self.fields: dict[str, str] = {}
        self.files: dict[str, bytes] = {}
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._hfield, "on_header_value": self._hvalue,
                "on_header_end": self._hend, "on_headers_finished": self._headers_done,
                "on_part_data": self._data, "on_part_end": self._end}

    def _begin(self) -> None:
        self._part = _Part()

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _hend(self) -> None:
        self._part.headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name, self._header_value = bytearray(), bytearray()

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._part.headers.get(b"content-disposition", b""))
        field_name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        part = self._part
        part.is_file = filename is not None
        if not part.is_file:
            if field_name not in FIELD_KEYS:
                raise ApiError(400, f"unexpected form field {field_name[:80]!r}: the fields are 'name' and "
                                    "'overwrite'", code="invalid_upload", param=field_name[:80])
            part.key = field_name
            return
        base = filename.decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
        key = field_name if field_name in FILE_KEYS else base
        if key.lower().endswith(PICKLE_SUFFIXES) or base.lower().endswith(PICKLE_SUFFIXES):
            raise ApiError(400, pickle_message(base or key), code="invalid_adapter", param=field_name[:80])
        if key not in FILE_KEYS:
            raise ApiError(400, f"unexpected file {key[:80]!r}: upload adapter_config.json and "
                                "adapter_model.safetensors, or one archive", code="invalid_upload",
                           param=field_name[:80])
        if key in self.files:
            raise ApiError(400, f"{key} was sent twice", code="invalid_upload", param=key)
        part.key = key

    def _data(self, data: bytes, start: int, end: int) -> None:
        part, size = self._part, end - start
        if part.is_file:
            self.file_bytes += size
            if self.file_bytes > self.limit:
                raise too_large(self.limit)
        elif len(part.data) + size > MAX_FIELD_BYTES:
            raise ApiError(400, f"form field {part.key!r} is too long", code="invalid_upload", param=part.key)
        part.data += data[start:end]

    def _end(self) -> None:
        part = self._part
        if part.is_file:
            self.files[part.key] = bytes(part.data)
            return
        value = part.data.decode("utf-8", "replace")
        if part.key == "name":
            validate_name(value, self.base_name)  # fail fast, before the files arrive
        self.fields[part.key] = value


async def read_upload(request: Request, limit: int, base_name: str) -> Upload:
    """Parse, bound and check a multipart adapter upload; nothing about the adapter itself is trusted."""
    content_type = request.headers.get("content-type", "")
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise ApiError(415, "send the adapter as multipart/form-data (fields: name, overwrite; files: "
                            "adapter_config.json + adapter_model.safetensors, or archive)", code="invalid_upload")
    body_limit = limit + MULTIPART_SLACK
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > body_limit:
        if int(declared) <= DRAIN_LIMIT:
            await _drain(request.stream(), 0)
        raise too_large(limit)
    reader = MultipartReader(limit, base_name)
    parser = MultipartParser(options[b"boundary"], reader.callbacks())
    received = 0
    stream = request.stream()
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > body_limit:
                raise too_large(limit)
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise ApiError(400, f"malformed multipart body: {exc}", code="invalid_upload") from exc
    except ClientDisconnect as exc:
        raise ApiError(400, "the client went away during the upload", code="client_disconnected") from exc
    except ApiError:
        await _drain(stream, received)
        raise
    # Archive reading and checks run off the event loop: streams in flight keep flowing.
    return await asyncio.to_thread(_assemble, reader, limit, base_name)


async def _drain(stream, received: int) -> None:
    """Read the rest of a refused body (dropping it) so the client gets the error instead of a reset."""
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > DRAIN_LIMIT:
                return
    except Exception:
        return


def _assemble(reader: MultipartReader, limit: int, base_name: str) -> Upload:
    if "name" not in reader.fields:
        raise ApiError(400, "missing form field 'name' (the adapter's name)", code="invalid_upload", param="name")
    name = validate_name(reader.fields["name"], base_name)
    overwrite = parse_bool(reader.fields.get("overwrite", "false"), "overwrite")
    files = reader.files
    if "archive" in files:
        if len(files) > 1:
            raise ApiError(400, "send either one archive or the two adapter files, not both",
                           code="invalid_upload", param="archive")
        files = read_archive(files["archive"], limit)
    for needed in (CONFIG_FILE, WEIGHTS_FILE):
        if needed not in files:
            raise ApiError(400, f"the upload has no {needed}: send adapter_config.json and "
                                "adapter_model.safetensors, or one archive holding them",
                           code="invalid_adapter", param=needed)
    check_safetensors(files[WEIGHTS_FILE], WEIGHTS_FILE)
    return Upload(name=name, overwrite=overwrite, config=files[CONFIG_FILE], weights=files[WEIGHTS_FILE])
