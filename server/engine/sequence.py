"""One request's state inside the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from server.adapters.composition import ComposedRecord
from server.adapters.peft_format import ParsedAdapter
from server.adapters.records import AdapterRecord
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.grammar import Constraint
from server.engine.request import SamplingParams, TokenLogprob
from server.engine.sampler import SamplingOptions
from server.engine.stream import RequestStream


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Tokens, KV blocks and adapter pin of one request.

    `token_ids` is the prompt plus every generated token; the first `num_computed` of them
    are in the KV cache. A step feeds `token_ids[num_computed:]` (a prefill chunk, or the one
    newest token when decoding); after preemption `num_computed` drops to 0 and the whole
    sequence is recomputed.
    """

    request_id: str
    key: str                               # unique per choice: "<request_id>" or "<request_id>#<j>"
    prompt_len: int
    token_ids: list[int]
    params: SamplingParams
    options: SamplingOptions
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    stream: RequestStream
    record: AdapterRecord | ComposedRecord | None  # None = the base model
    adapter: ParsedAdapter | None = None  # this request's own reference to its version's weights
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    slot: int | None = None               # device slot while running; -1 = base
    children: list[Sequence] = field(default_factory=list)  # choices 1..n-1, forked after this one's prefill
    skips: int = 0                        # times admission found every device slot pinned
    sha_prefix: str | None = None         # "name@<prefix>" requests: never rebound to another version
    hash_seed: bytes | None = None        # prefix cache: the chain's seed (the weights' identity) ...
    block_hashes: list[bytes] = field(default_factory=list)  # ... the chain over its full blocks so far
    num_published: int = 0                # leading blocks that are in the prefix cache (published or hit)
    constraint: Constraint | None = None  # structured output: the grammar state (None = free text)
    # Prompt logprobs, when asked for: one entry per prompt token, filled as prefill chunks run (the first,
    # set at the start, has no logprob: nothing predicts it). Shared with the choices forked from this one.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    echo_text: str | None = None          # the prompt's text, sent back with the first delta (echo)

    @property
    def group_size(self) -> int:
        """Sequences that run once this one is admitted (itself plus the choices forked from it)."""
        return 1 + len(self.children)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the KV cache: the rest of the prompt, or the newest token."""
        return len(self.token_ids) - self.num_computed
