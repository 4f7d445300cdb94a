"""The engine core: the one thread that steps the model.

Other threads talk to it only through its inbox (`inbox.py`). Every step, the scheduler picks which
sequences run, the runner feeds them all through ONE packed forward pass whatever adapter each
uses, and the sampler picks every sampled sequence's next token in one vectorised pass. The `n`
choices of one prompt share its prefill: the first choice is prefilled alone, then the others
fork its KV blocks (shared full blocks, a private copy of the last partial one) and sample their
first token from the same logits row. The scheduler writes every sequence's scheduling state
(`computed`, `fork`, `finish`); the core appends the sampled tokens and streams the deltas.
"""

from __future__ import annotations

import logging
import threading
from typing import cast

from server.adapters.identity import AdapterKey
from server.engine.adapters import AdapterManager
from server.engine.grammar import GrammarCompiler
from server.engine.inbox import Inbox
from server.engine.output import finish_reason, make_delta, record_prompt_logprobs
from server.engine.request import EngineError, EngineFaultError
from server.engine.runner import ModelRunner
from server.engine.sampler import SampleOutput, Sampler
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.threads import use_torch_threads

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, *, scheduler: Scheduler, runner: ModelRunner, manager: AdapterManager, inbox: Inbox,
                 tokenizer, eos_ids: frozenset[int], max_context: int, threads: int | None = None,
                 grammars: GrammarCompiler | None = None) -> None:
        self.threads = threads  # torch threads of the step loop (None: torch's default; server/threads.py says why)
        self.scheduler = scheduler
        self.runner = runner
        self.manager = manager
        self.inbox = inbox
        self.sampler = Sampler()
        self.grammars = grammars   # masks of the structured-output sequences, all of a step's at once
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_context = max_context
        self.prefill_tokens = 0  # prompt tokens fed through the model since start-up (forks add none)
        self._seqs: dict[str, Sequence] = {}
        self._live = 0           # sequences posted and not yet finished (any thread reads it)
        self._live_lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # Any thread -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self.inbox.wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def add(self, seqs: list[Sequence]) -> None:
        """Enqueue one request's sequences: the first is prefilled, the others fork from it."""
        with self._live_lock:
            self._live += sum(s.group_size for s in seqs)
        self.inbox.post("add", seqs)

    def abort(self, key: str) -> None:
        self.inbox.post("abort", key)

    def num_active(self) -> int:
        """Sequences enqueued, waiting or running."""
        return self._live

    def num_waiting(self) -> int:
        waiting = sum(s.group_size for s in list(self.scheduler.waiting))
        posted = cast(list[list[Sequence]], self.inbox.pending("add"))
        return waiting + sum(s.group_size for seqs in posted for s in seqs)

    # The engine thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        use_torch_threads(self.threads)
        while not self._stopping:
            self._drain_inbox()
            self._fail_unstartable()
            self.manager.prefetch(self.scheduler.waiting)  # disk loads for the sequences next in line
            if not self.scheduler.has_work():
                self.inbox.wait(timeout=1.0)
                continue
            try:
                # Adapters of requests next in line into free pool room: their admission is then a pin.
                self.manager.preload(self.scheduler.waiting, limit=2)
                if not self._step():
                    self.inbox.wait(timeout=0.005)  # everything waits on an adapter load
            except Exception:  # a bug must not kill the server: fail the batch, keep serving
                log.exception("engine step failed")
                for seq in list(self.scheduler.running):
                    self._fail(seq, EngineFaultError("the server failed while generating; see its log"))

    def _drain_inbox(self) -> None:
        for kind, payload in self.inbox.take():
            if kind == "add":
                for seq in cast(list[Sequence], payload):
                    self._seqs[seq.key] = seq
                    for child in seq.children:
                        self._seqs[child.key] = child
                    self.scheduler.add(seq)
            elif kind == "abort":
                aborted = self._seqs.get(cast(str, payload))
                if aborted is not None:
                    self._finish(aborted)
            elif kind == "evict":
                self.manager.evict_if_idle(cast(AdapterKey, payload))

    def _fail_unstartable(self) -> None:
        for seq in list(self.scheduler.waiting):
            error = self.manager.waiting_error(seq)
            if error is not None:
                self._fail(seq, error)

    def _step(self) -> bool:
        plan = self.scheduler.schedule()
        if not plan:
            return False
        self.prefill_tokens += sum(max(0, min(p.num_tokens, p.seq.prompt_len - p.seq.num_computed)) for p in plan)
        ordered, logits = self.runner.step(plan)
        self.scheduler.computed(ordered)
        record_prompt_logprobs(self.tokenizer, ordered, logits[len(ordered):])
        for item in ordered:
            if item.samples and not item.seq.params.max_tokens:
                self._end_scoring(item.seq)
        rows = [i for i, item in enumerate(ordered) if item.samples and item.seq.params.max_tokens]
        if not rows:
            return True
        seqs = [ordered[i].seq for i in rows]
        for i, seq in enumerate(list(seqs)):
            if seq.children and not seq.output_ids:  # its prefill just ended: the other choices fork now
                forked = self.scheduler.fork(seq)
                seqs += forked
                rows += [rows[i]] * len(forked)
        outs = self.sampler.sample(logits[rows], [s.options for s in seqs], [s.generator for s in seqs],
                                   [s.output_ids for s in seqs], self._allowed(seqs), self._banned(seqs))
        for seq, out in zip(seqs, outs):
            self._append(seq, out)
        return True

    def _end_scoring(self, seq: Sequence) -> None:
        """A request with max_tokens 0 (prompt scoring) ends once its prompt is computed, it and its choices."""
        for child in [*seq.children, seq]:  # the choices first: finishing `seq` would restart them
            child.prompt_logprobs = seq.prompt_logprobs
            self._finish(child)
            child.stream.put(make_delta(self.tokenizer, child, "", None, "length"))

    def _banned(self, seqs: list[Sequence]) -> list[tuple[int, ...]] | None:
        """End-of-sequence tokens of the rows still short of their min_tokens."""
        banned = [tuple(self.eos_ids) if len(s.output_ids) < s.params.min_tokens and not s.params.ignore_eos
                  else () for s in seqs]
        return banned if any(banned) else None

    def _allowed(self, seqs: list[Sequence]):
        """(rows, masks) of the step's constrained sequences, filled in one call; None when there are none."""
        constrained = [(i, seq.constraint) for i, seq in enumerate(seqs) if seq.constraint is not None]
        if not constrained or self.grammars is None:
            return None
        return [i for i, _ in constrained], self.grammars.fill_masks([c for _, c in constrained])

    def _append(self, seq: Sequence, out: SampleOutput) -> None:
        seq.token_ids.append(out.token)
        if seq.record is not None:
            seq.record.tokens += 1
        is_eos = out.token in self.eos_ids
        if seq.constraint is not None and not seq.constraint.accept(out.token):
            log.error("request %s: token %d is outside its grammar; ending it", seq.request_id, out.token)
            is_eos = True
        text = "" if is_eos and not seq.params.ignore_eos else seq.detokenizer.push(out.token)
        reason = finish_reason(seq, is_eos, self.max_context)
        if reason is not None:
            text += seq.detokenizer.finish()
            self._finish(seq)
        seq.stream.put(make_delta(self.tokenizer, seq, text, out, reason))

    def _fail(self, seq: Sequence, error: EngineError) -> None:
        self._finish(seq)
        seq.stream.put(error)

    def _finish(self, seq: Sequence) -> None:
        """Free a finished, failed or aborted sequence; choices still waiting to fork start on their own."""
        if not self.scheduler.finish(seq):
            return
        if self._seqs.get(seq.key) is seq:
            del self._seqs[seq.key]
        with self._live_lock:
            self._live -= 1
