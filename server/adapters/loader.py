"""The adapter loader: background parses of registered versions from the store into memory.

One worker thread. A load reads the version's files, checks they still hash to the version's
sha256 and that no overwrite renamed another file in while it parsed (supersession), then hands
the result to `settle`; the registry decides there whether the version is still current.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from server.adapters.folder import Parse, file_id, read, read_contract
from server.adapters.identity import file_sha256
from server.adapters.names import CONFIG_FILE, WEIGHTS_FILE
from server.adapters.peft_format import AdapterFormatError, ParsedAdapter
from server.adapters.records import AdapterRecord
from server.threads import FreshThreadPool

log = logging.getLogger(__name__)

# (record, its weights or None, an error or None): both None when the store holds another version now.
Settle = Callable[[AdapterRecord, ParsedAdapter | None, str | None], None]


class Superseded(Exception):
    """The store's bytes for a name are not the version being loaded."""


class AdapterLoader:
    def __init__(self, *, parse: Parse, settle: Settle) -> None:
        self._parse = parse
        self._settle = settle
        self._pool = FreshThreadPool(max_workers=1, thread_name_prefix="adapter-loader")

    def submit(self, record: AdapterRecord) -> None:
        """Load `record` in the background (the caller marked it LOADING)."""
        self._pool.submit(self._run, record)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, record: AdapterRecord) -> None:
        try:
            adapter = self.read(record)
        except Superseded:
            log.info("discarded a load of %s v%d: the store holds another version now", record.name, record.version)
            self._settle(record, None, None)
        except (AdapterFormatError, OSError) as exc:
            log.error("adapter %s failed to load: %s", record.name, exc)
            self._settle(record, None, str(exc))
        else:
            self._settle(record, adapter, None)

    def read(self, record: AdapterRecord) -> ParsedAdapter:
        """The version's weights, if the bytes read are still this version's (else `Superseded`)."""
        config, weights = read(record.folder / CONFIG_FILE), record.folder / WEIGHTS_FILE
        hashed = file_id(weights)
        if file_sha256(config, weights, contract_bytes=read_contract(record.folder)) != record.sha256:
            if record.deleted:
                raise Superseded
            raise AdapterFormatError("the stored files changed since registration (sha256 mismatch)")
        adapter = self._parse(config, weights)
        if file_id(weights) != hashed:  # an overwrite renamed another file in between
            raise Superseded
        return adapter
