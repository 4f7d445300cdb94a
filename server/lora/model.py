"""Injection of slot-buffered LoRA layers into a transformers model, slot writes, and the dense
prefix of used slots that lets the op skip idle adapters.

Slots are the engine's names for adapter places (`SlotTable`). With the compiled CPU kernels
(`Backend.pooled`) every adapter's weights sit in one byte-sized `AdapterPool` at their own rank and
only for the modules it targets, a slot is just an index into small per-slot tables, and rows are
slots. Otherwise rows are where their weights physically sit in per-slot buffers padded to the max
rank. `place(used)` keeps the adapters a step uses in a nearly dense
prefix of rows (compacting them into `0 .. len(used)-1` by swapping rows once more than a
few idle rows sit below the highest used one), so the op's padded batch reads the adapters in
flight and at most a bounded number of idle ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import cast

import torch
from transformers import PreTrainedModel

from server.adapters.layout import BaseLayout
from server.adapters.peft_format import ParsedAdapter
from server.lora.layers import LoraGroup, LoraLinear, StepState
from server.lora.ops import Backend, backend_for
from server.lora.pool import PAGE_BYTES, AdapterPool
from server.lora.special import LoraEmbedding, LoraHead, replacement
from server.lora.step import DeviceTables, LoraStepMeta

# Sibling projections that read the same input and so share one stacked shrink.
STACKED_SIBLINGS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                                                 ("query", "key", "value"), ("w1", "w3"))


class LoraModel:
    """Owns the LoRA layers wrapped around every linear module of one base model.

    Every module in `layout.linear` is wrapped once, at start-up, so any adapter that
    validates against the layout can be written into any slot without touching the model.
    """

    def __init__(self, model: PreTrainedModel, layout: BaseLayout, max_loras: int, max_rank: int,
                 backend: Backend | None = None, weight_dtype: torch.dtype | None = None,
                 pool_bytes: int | None = None, page_bytes: int = PAGE_BYTES) -> None:
        """`backend`: the LoRA op (default: `backend_for` the model's device and dtype); `weight_dtype`:
        the slots' (default: the model's; bfloat16 beside a float32 model halves the bytes per step).
        `max_loras`: slots (adapters resident at once at most); `pool_bytes`: the adapter pool's size when
        the backend reads a pool (default: what `max_loras` padded slots would take)."""
        weight = next(model.parameters())
        self.model = model
        self.layout = layout
        self.max_loras, self.max_rank = max_loras, max_rank
        self.device = weight.device
        self.weight_dtype = weight_dtype or weight.dtype
        self.state = StepState()
        self.backend = backend or backend_for(weight.device, weight.dtype)
        # The step's tables and the output layer's, each through buffers reused every step (pinned on CUDA).
        self._step_tables, self._head_tables = DeviceTables(weight.device), DeviceTables(weight.device)
        self.padded_slot_bytes = padded_slot_bytes(layout, max_rank, self.weight_dtype)
        self.pool = None
        if self.backend.pooled:
            # By default as much as `max_loras` adapters of the max rank on every module can take, the
            # output layer and the input embedding included, each rounded up to whole pages.
            per_slot = self.padded_slot_bytes + _special_slot_bytes(model, max_rank, self.weight_dtype) + page_bytes
            nbytes = pool_bytes if pool_bytes is not None else max_loras * per_slot
            self.pool = AdapterPool(nbytes, max_loras, weight.device, self.weight_dtype, page_bytes)
        self.layers: dict[str, LoraLinear] = {}
        self.groups: list[LoraGroup] = []
        self.slot_writes = 0  # adapters copied into slots since start-up (swaps show up here)
        self.row_moves = 0    # adapters moved between rows to keep the used slots a dense prefix
        self.adapter_steps = 0  # sum over steps of the distinct adapters each step ran (weights read per step)
        self.row_of = list(range(max_loras))   # slot -> row
        self.slot_at = list(range(max_loras))  # row -> slot
        self.row_ranks = [0] * max_loras       # rank of the adapter in each row, 0 = empty
        # The output layer and the input embedding, wrapped on first use (`_special`).
        self.special: dict[str, LoraHead | LoraEmbedding] = {}
        for names in _group_names(layout):
            fan_in = layout.linear[names[0]][0]
            group = LoraGroup(len(names), fan_in, max_loras, max_rank, weight.device, self.weight_dtype, self.backend,
                              self.pool)
            self.groups.append(group)
            for index, name in enumerate(names):
                base = model.get_submodule(name)
                layer = LoraLinear(base, fan_in, layout.linear[name][1], group, index, self.state)
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
                self.layers[name] = layer

    # Slots ----------------------------------------------------------------------------------------

    def write_slot(self, slot: int, adapter: ParsedAdapter) -> None:
        """Load `adapter` into `slot` of every layer (modules it does not target get zeros)."""
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter rank {adapter.rank} exceeds max_lora_rank {self.max_rank}")
        row = self.row_of[slot]
        at: dict[str, tuple[int, int]] = {}
        if self.pool is not None:
            self.pool.free(row)
            at, elements = self._pool_blocks(adapter)
            self.pool.allocate(row, elements)
        for name, layer in self.layers.items():
            weights = adapter.modules.get(name)
            if weights is None:
                layer.clear_slot(row)
            else:
                layer.write_slot(row, weights.a, weights.b, weights.scale, weights.magnitude, at.get(name))
        for name in set(self.special) | self._special_parts(adapter):
            self._write_special(self._special(name), row, adapter, name, at.get(name))
        self.row_ranks[row] = adapter.rank
        self.slot_writes += 1

    def _pool_blocks(self, adapter: ParsedAdapter) -> tuple[dict[str, tuple[int, int]], int]:
        """Where each module's (A, B) blocks go in the adapter's extent, and the extent's elements."""
        at, cursor = {}, 0
        for name, weights in adapter.modules.items():
            layer = self.layers.get(name) or self._special(name).lora_layer()
            a_elements, b_elements = layer.pool_elements(weights.a.shape[0])
            at[name] = (cursor, cursor + a_elements)
            cursor += a_elements + b_elements
        return at, cursor

    def slot_bytes(self, adapter: ParsedAdapter) -> int:
        """Device bytes `adapter` takes once written: its pool pages, or one padded slot."""
        if self.pool is None:
            return self.padded_slot_bytes
        return self.pool.bytes_for(self._pool_blocks(adapter)[1])

    @property
    def capacity_bytes(self) -> int | None:
        """The adapter pool's bytes (None without a pool: the slot count is the limit)."""
        return None if self.pool is None else self.pool.nbytes

    def _special_parts(self, adapter: ParsedAdapter) -> set[str]:
        """The output-layer / input-embedding modules an adapter changes (LoRA, a trained copy, token rows)."""
        return (adapter.modules.keys() - self.layers.keys()) | adapter.saved.keys() | adapter.tokens.keys()

    def _write_special(self, layer: LoraHead | LoraEmbedding, row: int, adapter: ParsedAdapter, name: str,
                       at: tuple[int, int] | None) -> None:
        saved, tokens = adapter.saved.get(name), adapter.tokens.get(name)
        replaced = None
        if saved is not None:
            replaced = replacement(saved, None, layer.weight)
        elif tokens is not None:
            replaced = replacement(tokens.rows, tokens.indices, layer.weight)
        layer.write_slot(row, adapter.modules.get(name), replaced, at)

    def _special(self, name: str) -> LoraHead | LoraEmbedding:
        """The output layer's or the input embedding's slot layer, wrapped around it on first use."""
        layer = self.special.get(name)
        if layer is None:
            base = self.model.get_submodule(name)
            kind = LoraHead if name == self.layout.output_name else LoraEmbedding
            layer = kind(base, self.max_loras, self.max_rank, self.weight_dtype, self.backend, self.state, self.pool)
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, layer)
            self.special[name] = layer
        return layer

    @property
    def saved_bytes(self) -> int:
        """Bytes the slots' replaced weights (trained copies, token rows) take on the device."""
        return sum(layer.replacements.nbytes for layer in self.special.values())

    def clear_slot(self, slot: int) -> None:
        row = self.row_of[slot]
        for layer in self.layers.values():
            layer.clear_slot(row)
        for special in self.special.values():
            special.clear_slot(row)
        self.row_ranks[row] = 0
        if self.pool is not None:
            self.pool.free(row)

    def place(self, used: Iterable[int]) -> dict[int, int]:
        """Rows of the `used` slots, all below `len(used) + placement_slack(len(used))`.

        An idle row inside the op's padded batch costs one adapter's bytes per step; moving rows
        costs a copy of every buffer's moved rows plus two calls per buffer. So the used rows are
        compacted into `0 .. len(used) - 1` only once the idle rows below the highest used one
        exceed the slack, not each time a request ends (which made steps thrash rows).
        """
        used = sorted(set(used))
        if self.pool is not None:  # the kernels read any slot where it lies: nothing to compact
            return {s: s for s in used}
        k = len(used)
        top = max((self.row_of[s] for s in used), default=-1) + 1
        if top > k + placement_slack(k):
            movers = [s for s in used if self.row_of[s] >= k]
            used_set = set(used)
            free = [r for r in range(k) if self.slot_at[r] not in used_set]
            self._swap_rows([(self.row_of[s], r) for s, r in zip(movers, free)])
        return {s: self.row_of[s] for s in used}

    @torch.no_grad()
    def _swap_rows(self, pairs: list[tuple[int, int]]) -> None:
        src = list(range(self.max_loras))
        for p, q in pairs:
            src[p], src[q] = q, p
            sp, sq = self.slot_at[p], self.slot_at[q]
            self.slot_at[p], self.slot_at[q] = sq, sp
            self.row_of[sp], self.row_of[sq] = q, p
            self.row_ranks[p], self.row_ranks[q] = self.row_ranks[q], self.row_ranks[p]
        rows = [r for r in range(self.max_loras) if src[r] != r]
        dst = torch.tensor(rows, device=self.device)
        from_ = torch.tensor([src[r] for r in rows], device=self.device)
        for buf in [g.a_storage for g in self.groups] + [layer.b_storage for layer in self.layers.values()]:
            buf.index_copy_(0, dst, buf.index_select(0, from_))
        for group in self.groups:
            group.ranks.move_rows(dst, from_)
        sources = [src[r] for r in rows]
        for layer in self.layers.values():
            if layer.dora is not None:
                layer.dora.move_rows(rows, sources)
        for special in self.special.values():
            special.move_rows(rows, sources, dst, from_)
        self.row_moves += len(pairs)

    # Steps ----------------------------------------------------------------------------------------

    def step_meta(self, token_rows: list[int], num_decode: int = 0) -> LoraStepMeta:
        """The step context for packed tokens whose adapter ROWS (from `place`; -1 = base) are given."""
        meta = LoraStepMeta.build(token_rows, self.row_ranks, self.device, num_decode, self.max_rank,
                                  self.backend.plan, self._step_tables)
        self.adapter_steps += len(set(token_rows) - {-1})
        return meta

    @contextmanager
    def stepping(self, meta: LoraStepMeta | None, head_rows: torch.Tensor | None = None) -> Iterator[None]:
        """Run the layers with `meta` for one forward pass (None: base model only). `head_rows [n]`: the
        packed rows the output layer runs on, when it runs on those only (the engine's sampled rows)."""
        self.state.meta = meta
        self.state.head_meta = self.head_meta(meta, head_rows)
        try:
            yield
        finally:
            self.state.meta = self.state.head_meta = None

    def head_meta(self, meta: LoraStepMeta | None, head_rows: torch.Tensor | None) -> LoraStepMeta | None:
        """The step context of the output layer's rows, built only when an adapter of the step changes it."""
        head = self.special.get(self.layout.output_name or "")
        if meta is None or head_rows is None or head is None or not meta.row_mask & head.users():
            return None
        slots = [meta.host_slots[r] for r in head_rows.tolist()]
        return LoraStepMeta.build(slots, self.row_ranks, self.device, len(slots), self.max_rank,
                                  self.backend.plan, self._head_tables)


def padded_slot_bytes(layout: BaseLayout, max_rank: int, dtype: torch.dtype) -> int:
    """Bytes of one slot padded to `max_rank` on every linear module (A and B): what a slot of the
    per-slot buffers takes, whatever the adapter in it."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max_rank * sum(fan_in + fan_out for fan_in, fan_out in layout.linear.values()) * itemsize


def _special_slot_bytes(model: PreTrainedModel, max_rank: int, dtype: torch.dtype) -> int:
    """Bytes of LoRA of `max_rank` on the output layer and on the input embedding."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for module in (model.get_output_embeddings(), model.get_input_embeddings()):
        if module is not None:
            total += max_rank * sum(cast(torch.Tensor, module.weight).shape) * itemsize
    return total


def placement_slack(used: int) -> int:
    """Idle rows the padded batch of `used` adapters may span before they are compacted."""
    return max(2, used // 4)


def _group_names(layout: BaseLayout) -> list[tuple[str, ...]]:
    """Every LoRA-able module in a group: stacked siblings of one parent with one input size, else alone."""
    names = set(layout.linear)
    groups: list[tuple[str, ...]] = []
    grouped: set[str] = set()
    parents = sorted({n.rpartition(".")[0] for n in names})
    for parent in parents:
        prefix = f"{parent}." if parent else ""
        for siblings in STACKED_SIBLINGS:
            full = tuple(prefix + s for s in siblings)
            if all(f in names for f in full) and len({layout.linear[f][0] for f in full}) == 1:
                groups.append(full)
                grouped.update(full)
    groups += [(n,) for n in sorted(names - grouped)]
    return groups
