"""Weighted compositions of registered adapters, computed exactly.

`model: "a*0.7+b*0.3"` asks for the base plus `0.7 * delta_a + 0.3 * delta_b`. A weighted sum of
LoRA deltas is itself one LoRA: per module, A is the parts' A stacked along the rank and B their B,
each multiplied by its part's weight and scale, stacked the same way (scale 1). So a composition
runs through the same slots and the same op as any adapter, with a rank of at most the sum of its
parts' ranks; a module that only some parts target stacks only theirs (the others' blocks would be
zeros). This is PEFT's `add_weighted_adapter(..., combination_type="cat")`, without its quirks of
inheriting the first part's rsLoRA flag and `layers_to_transform`.

Identity: a composition is keyed by its parts' keys (generation + sha256) and weights, so an
overwrite or delete of a part gives every later request a new key, never the old weights; its
content hash (parts' sha256 and weights only) seeds the prefix cache.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch

from server.adapters.identity import AdapterKey
from server.adapters.peft_format import LoraModuleWeights, ParsedAdapter
from server.adapters.records import ERROR, READY, AdapterRecord

MAX_PARTS = 8
MAX_WEIGHT = 16.0
_DOMAIN = b"loraplex-composition-v1\0"
_PART = re.compile(r"\s*(?P<name>[^*+\s]+)\s*(?:\*\s*(?P<weight>-?(?:\d+(?:\.\d*)?|\.\d+))\s*)?")


class CompositionError(ValueError):
    """A composition expression this server refuses; the message says why."""


def is_composition(model: str) -> bool:
    return "*" in model or "+" in model


@dataclass(frozen=True)
class PartSpec:
    """One `name[*weight]` of an expression; `name` may carry an `@<sha256 prefix>` pin."""

    name: str
    weight: float


def parse_expression(model: str) -> list[PartSpec]:
    """`"a*0.7+b*0.3"` -> parts; a missing weight is 1. Raises `CompositionError`."""
    parts: list[PartSpec] = []
    for raw in model.split("+"):
        match = _PART.fullmatch(raw)
        if match is None:
            raise CompositionError(f"cannot read {raw.strip()!r} in the composition {model!r}: write "
                                   "'name*weight' parts joined by '+', e.g. 'a*0.7+b*0.3' (weights are decimals)")
        weight = float(match["weight"]) if match["weight"] is not None else 1.0
        if not math.isfinite(weight) or weight == 0 or abs(weight) > MAX_WEIGHT:
            raise CompositionError(f"weight {match['weight']} of {match['name']!r} must be a non-zero number "
                                   f"between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}")
        parts.append(PartSpec(match["name"], weight))
    if len(parts) > MAX_PARTS:
        raise CompositionError(f"a composition has at most {MAX_PARTS} parts, got {len(parts)}")
    names = [p.name.partition("@")[0] for p in parts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CompositionError(f"adapter {duplicates[0]!r} appears more than once in the composition; "
                               "give it once with the sum of its weights")
    return parts


@dataclass(frozen=True)
class CompositionKey:
    """Identity of one composition of exact versions: device slots and the CPU tier are keyed by it."""

    parts: tuple[tuple[AdapterKey, float], ...]   # canonical order (see `canonical_order`)

    @property
    def sha256(self) -> str:
        """Content hash: the parts' sha256 and weights (not their generations), hex."""
        digest = hashlib.sha256(_DOMAIN)
        for key, weight in self.parts:
            digest.update(f"{key.sha256}*{weight!r};".encode())
        return digest.hexdigest()

    def involves(self, key: AdapterKey) -> bool:
        return any(part == key for part, _ in self.parts)


@dataclass(eq=False)
class ComposedRecord:
    """What a request for a composition holds in place of an `AdapterRecord`: its exact part versions.

    `deleted` is true once any part is no longer current (overwritten or deleted): its slot and
    cached weights are then freed when idle, and a request still waiting re-resolves `name`.
    """

    name: str                                        # the expression as asked, e.g. "a*0.7+b*0.3"
    parts: tuple[tuple[AdapterRecord, float], ...]   # canonical order
    requests: int = 0
    tokens: int = 0
    loads: int = 0
    load_seconds: float = 0.0

    @classmethod
    def of(cls, name: str, parts: list[tuple[AdapterRecord, float]]) -> ComposedRecord:
        order = canonical_order([(record.key, weight) for record, weight in parts])
        return cls(name, tuple(parts[i] for i in order))

    @property
    def key(self) -> CompositionKey:
        return CompositionKey(tuple((record.key, weight) for record, weight in self.parts))

    @property
    def sha256(self) -> str:
        return self.key.sha256

    @property
    def rank(self) -> int:
        return sum(record.rank for record, _ in self.parts)

    @property
    def contract(self) -> None:
        """A composition has no contract of its own (its parts' templates may disagree): requests are sent as is."""
        return None

    @property
    def deleted(self) -> bool:
        return any(record.deleted for record, _ in self.parts)

    @property
    def status(self) -> str:
        return ERROR if any(record.status == ERROR for record, _ in self.parts) else READY

    @property
    def error(self) -> str | None:
        errors = [f"{record.name}: {record.error}" for record, _ in self.parts if record.status == ERROR]
        return "; ".join(errors) or None


def canonical_order(parts: list[tuple[AdapterKey, float]]) -> list[int]:
    """Indices of `parts` sorted by (sha256, weight, generation): equal content stacks in one order,
    so two compositions with one content hash hold bitwise equal weights (and `a+b` == `b+a`)."""
    return sorted(range(len(parts)), key=lambda i: (parts[i][0].sha256, parts[i][1], parts[i][0].generation))


def compose(adapters: list[ParsedAdapter], weights: list[float]) -> ParsedAdapter:
    """One adapter equal to `sum_i weights[i] * delta_i`, in the order given (see the module docstring)."""
    modules: dict[str, LoraModuleWeights] = {}
    for name in sorted({m for adapter in adapters for m in adapter.modules}):
        pieces = [(adapter.modules[name], w) for adapter, w in zip(adapters, weights) if name in adapter.modules]
        a = torch.cat([m.a for m, _ in pieces], dim=0).contiguous()
        b = torch.cat([m.b * (w * m.scale) for m, w in pieces], dim=1).contiguous()
        modules[name] = LoraModuleWeights(a=a, b=b, scale=1.0)
    size = sum(m.a.nbytes + m.b.nbytes for m in modules.values())
    return ParsedAdapter(rank=max(m.a.shape[0] for m in modules.values()), alpha=1.0,
                         target_modules=tuple(modules), modules=modules, config={}, size_bytes=size)
