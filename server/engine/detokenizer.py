"""Incremental detokenization for streaming, with stop strings.

Decoding is windowed (the prefix_offset/read_offset scheme used by vLLM and TGI): each step decodes
only tokens[prefix_offset:], and the new text is what that window adds beyond the already-returned
tokens[prefix_offset:read_offset]. Starting the window a few tokens back, rather than at read_offset,
lets tokenizers that render a token differently at the start of a decode (SentencePiece's leading
space) still produce the right delta. A window whose text ends in U+FFFD is an incomplete UTF-8
sequence (or a byte-level token splitting a character): it is held back until completed or finish().
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens kept as left context for the first window


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into safe-to-send text deltas.

    Invariant: the concatenation of everything returned by push()/finish() equals
    `tokenizer.decode(generated_ids, skip_special_tokens=...)` cut before the first stop string
    (for tokenizers where decoding concatenates token texts, e.g. byte-level BPE; with a prompt as
    left context, SentencePiece's leading space of the first generated token is kept, as it should be
    when appending to the prompt).
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int] | None = None, stop: Sequence[str] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = list(prompt_ids or [])[-PROMPT_CONTEXT_TOKENS:]
        self.prefix_text = self._decode(self.ids)  # cached decode of ids[prefix_offset:read_offset]
        if self.prefix_text.endswith(REPLACEMENT_CHAR):
            # The prompt ends mid-character: no usable context, decode the output on its own.
            self.ids, self.prefix_text = [], ""
        self.prefix_offset = 0  # window start: context tokens whose text was already accounted for
        self.read_offset = len(self.ids)  # tokens before this have had their text released
        self.pending = ""  # decoded text not yet returned: it may begin a stop string
        self.stopped = False
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text newly safe to send ("" if it must wait)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        return self._release(self._advance(final=False), final=False)

    def finish(self) -> str:
        """End of generation: flush held-back text (incomplete characters, partial stop strings)."""
        if self.stopped:
            return ""
        return self._release(self._advance(final=True), final=True)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, final: bool) -> str:
        """New decoded text beyond read_offset, or "" while it ends in an incomplete character."""
        window_text = self._decode(self.ids[self.prefix_offset:])
        if len(window_text) <= len(self.prefix_text):
            return ""  # e.g. a skipped special token: nothing visible yet
        if window_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""
        delta = window_text[len(self.prefix_text):]
        # The next window starts at the tokens just released; their text becomes the new prefix.
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        return delta

    def _release(self, delta: str, final: bool) -> str:
        """Append delta to pending; return what can be sent, honouring the stop strings."""
        self.pending += delta
        cut = first_stop(self.pending, self.stop)
        if cut is not None:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
        else:
            hold = 0 if final else partial_stop_suffix(self.pending, self.stop)
            split = len(self.pending) - hold
            out, self.pending = self.pending[:split], self.pending[split:]
        self.text += out
        return out


def first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index of the earliest occurrence of any stop string in text, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def partial_stop_suffix(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
