"""Which adapter slot each token of a forward pass uses, computed once and shared by all LoRA layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraMapping:
    """Token-to-slot mapping of one forward pass, in the layout the LoRA op wants.

    `order` sorts tokens by slot with base tokens (-1) last; it is None when the tokens are
    already in that order (the engine packs them so). `offsets[s]` is the end of slot s's
    segment in sorted order; tokens at or past `num_lora_tokens` use the base model only.
    """

    num_tokens: int
    order: torch.Tensor | None      # [N] int64, or None for the identity
    offsets: torch.Tensor           # [S] int32, cumulative segment ends
    sorted_slots: torch.Tensor      # [num_lora_tokens] int64, slot of each sorted LoRA token
    num_lora_tokens: int
    rank: int                       # largest rank among the slots in use
    max_count: int                  # most tokens any one slot has in this pass
    pad_index: torch.Tensor         # [num_lora_tokens] row of each sorted LoRA token in a [S * max_count] padding
    padded: bool                    # padding every slot to max_count costs little: use the padded bmm

    # The padded bmm computes S * max_count rows; allow up to this many per real LoRA token.
    PADDING_FACTOR = 2

    @classmethod
    def build(cls, token_slots: torch.Tensor, slot_ranks: list[int]) -> LoraMapping:
        """token_slots: [N] int, -1 = base. slot_ranks: current rank of every slot (0 = empty)."""
        num_slots = len(slot_ranks)
        key = torch.where(token_slots < 0, num_slots, token_slots).to(torch.int64)
        if key.numel() > 1 and bool((key[1:] < key[:-1]).any()):
            order: torch.Tensor | None = torch.argsort(key, stable=True)
            key = key[order]
        else:
            order = None
        counts = torch.bincount(key, minlength=num_slots + 1)[:num_slots]
        counts_list = counts.tolist()
        used = [s for s, c in enumerate(counts_list) if c]
        n_lora = sum(counts_list)
        max_count = max(counts_list, default=0)
        sorted_slots = key[:n_lora]
        offsets = torch.cumsum(counts, 0)
        starts = offsets - counts
        within = torch.arange(n_lora, device=key.device) - starts[sorted_slots]
        return cls(
            num_tokens=int(token_slots.numel()),
            order=order,
            offsets=offsets.to(torch.int32),
            sorted_slots=sorted_slots,
            num_lora_tokens=n_lora,
            rank=max((slot_ranks[s] for s in used), default=0),
            max_count=max_count,
            pad_index=sorted_slots * max_count + within,
            padded=num_slots * max_count <= cls.PADDING_FACTOR * n_lora,
        )


class LoraContext:
    """The slot of every token in the current forward pass; all LoRA layers of one model share it.

    Two ways to set it: per token (the engine's packed batch, x viewed as [N, in]) or per row
    (a padded [B, L] batch where every token of row b uses slot b's adapter).
    """

    def __init__(self, num_slots: int, device: torch.device) -> None:
        self.slot_ranks = [0] * num_slots
        self.device = device
        self._token_slots: torch.Tensor | None = None
        self._row_slots: torch.Tensor | None = None
        self._cache: LoraMapping | None = None

    def set_token_slots(self, slots: torch.Tensor) -> None:
        self._token_slots, self._row_slots, self._cache = slots.to(self.device), None, None

    def set_row_slots(self, slots: torch.Tensor) -> None:
        self._token_slots, self._row_slots, self._cache = None, slots.to(self.device), None

    def clear(self) -> None:
        self._token_slots = self._row_slots = self._cache = None

    def mapping_for(self, num_tokens: int) -> LoraMapping | None:
        """The mapping for a layer input of `num_tokens` rows; None when every token is base."""
        if self._cache is not None and self._cache.num_tokens == num_tokens:
            return self._cache
        if self._token_slots is not None:
            slots = self._token_slots
        elif self._row_slots is not None:
            rows = self._row_slots.numel()
            if num_tokens % rows:
                raise RuntimeError(f"{num_tokens} tokens do not split into {rows} rows")
            slots = self._row_slots.repeat_interleave(num_tokens // rows)
        else:
            return None
        if slots.numel() != num_tokens:
            raise RuntimeError(f"LoRA mapping has {slots.numel()} slots for {num_tokens} tokens")
        self._cache = LoraMapping.build(slots, self.slot_ranks)
        return self._cache
