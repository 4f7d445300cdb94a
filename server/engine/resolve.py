"""What a request's `model` names: the base, an adapter's current version (`name`, or `name@<sha256
prefix>` pinned to it), or a weighted composition of adapters (`a*0.7+b*0.3`)."""

from __future__ import annotations

import re

from server.adapters.composition import ComposedRecord, CompositionError, is_composition, parse_expression
from server.adapters.records import ERROR, AdapterRecord
from server.adapters.registry import AdapterRegistry
from server.engine.request import (
    AdapterUnavailableError,
    AdapterVersionMismatchError,
    InvalidRequestError,
    UnknownModelError,
)

_SHA_PREFIX = re.compile(r"[0-9a-fA-F]{8,64}")

Resolved = tuple[AdapterRecord | ComposedRecord | None, str | None]


class ModelResolver:
    """Any thread: reads the registry's current versions only."""

    def __init__(self, *, registry: AdapterRegistry, base_name: str, max_rank: int) -> None:
        self.registry = registry
        self.base_name = base_name
        self.max_rank = max_rank

    def resolve(self, model: str) -> Resolved:
        """`model` -> (the adapter's record, a composition's record, or None for the base; the sha256 prefix
        a plain adapter was pinned to, if any: a composition's parts are checked against theirs here)."""
        if model == self.base_name:
            return None, None
        if is_composition(model):
            return self._composition(model), None
        return self.adapter(model)

    def _composition(self, model: str) -> ComposedRecord:
        """`"a*0.7+b@<sha>*0.3"` -> the current versions of its parts (each checked as a plain request is)."""
        try:
            specs = parse_expression(model)
        except CompositionError as exc:
            raise InvalidRequestError(str(exc)) from None
        parts = []
        for spec in specs:
            if spec.name == self.base_name:
                raise InvalidRequestError(f"the base model '{self.base_name}' cannot be part of a composition: "
                                          "the base is always there; compose adapters only")
            record, _ = self.adapter(spec.name)
            if record.kinds:
                raise InvalidRequestError(_not_composable(record))
            parts.append((record, spec.weight))
        composed = ComposedRecord.of(model.strip(), parts)
        if composed.rank > self.max_rank:
            raise InvalidRequestError(f"the composition's rank, the sum of its parts' ranks "
                                      f"({' + '.join(str(r.rank) for r, _ in parts)} = {composed.rank}), exceeds "
                                      f"this server's max LoRA rank of {self.max_rank} (--max-lora-rank)")
        return composed

    def adapter(self, model: str) -> tuple[AdapterRecord, str | None]:
        """A plain adapter's current version and the sha256 prefix it was pinned to, if any."""
        name, prefix = model, None
        if "@" in model:
            name, _, prefix = model.rpartition("@")
            if not _SHA_PREFIX.fullmatch(prefix):
                raise UnknownModelError(f"The model '{model}' does not exist: after '@' give at least 8 hex "
                                        "characters of the adapter's sha256")
            prefix = prefix.lower()
        record = self.registry.get(name)
        if record is None:
            raise UnknownModelError(f"The model '{name}' does not exist: it is neither the base model "
                                    f"'{self.base_name}' nor a registered adapter")
        if prefix is not None and not record.sha256.startswith(prefix):
            raise AdapterVersionMismatchError(f"adapter '{name}' is now version {record.version} with sha256 "
                                              f"{record.sha256}, which does not start with {prefix!r}")
        if record.status == ERROR:
            raise AdapterUnavailableError(f"adapter '{name}' failed to load: {record.error}")
        return record, prefix


def _not_composable(record: AdapterRecord) -> str:
    """Why an adapter that is more than plain LoRA cannot be part of a composition."""
    kind = record.kinds[0]
    if kind == "dora":
        why = ("it is a DoRA adapter: DoRA rescales the layer's whole output by its own magnitudes, so a "
               "weighted sum of DoRA adapters is not a sum of their deltas")
    else:
        why = (f"it replaces weights of {kind.partition(':')[2]} (modules_to_save or trainable tokens), which "
               "a weighted sum of LoRA deltas cannot express")
    return f"adapter '{record.name}' cannot be part of a composition: {why}; request it on its own"
