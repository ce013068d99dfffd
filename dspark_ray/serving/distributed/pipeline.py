"""Pipelining across requests: the drafter drafts one micro-batch while the target verifies the other.

`PipelinedEngine` is the `SpeculativeEngine` with another step strategy; it reuses the engine's
public phases (prefill, introduce, propose, commit, retire, free), so the commit, stop and
lossless logic is the engine's own. Running sequences alternate between two micro-batches. One
pipelined step:

    1. on a thread, the drafter frees the sequences the last step retired and proposes for the
       micro-batch that is not waiting for verification, while
       2. the target frees them too, prefills waiting requests (they join a later proposal) and
          verifies the micro-batch whose proposal is ready;
    3. join, introduce the new requests to the drafter, commit what the target kept, retire
       finished sequences (the workers free them in the next step, or at once if none follows).

Each sequence still alternates propose -> verify -> commit, with the same draft budgets and the
same per-sequence order of random draws as the unpipelined engine; only the batching differs.

Time-boxed drafting (on by default): the drafter drafts the upcoming micro-batch for as long as the
target took to verify in the last pipelined steps (smoothed; steps that prefilled are left out),
no longer (`Drafter.propose`'s time budget; greedy rows only, each keeps its first draft).
Drafting past that only keeps the target waiting; the draft LM drafts while any row is confident,
1 to 8 forwards, and one step in three used to outlast the verification.

With a load-aware governor (`engine.governor`), pipelined steps consult one of their own, so that
drafting on or off, at the full or the short length, is timed in the regime it runs in: a step
the governor keeps undrafted verifies every running sequence at once (overlap needs drafts), and
a drafting step proposes the next micro-batch at the governor's length.

Overlap pays when drafting and verifying both take time (each micro-batch costs only its own
rows: `CausalLMRunner.forward`); it loses when one of them is nearly free or both share a few
busy CPU cores. Mode "auto" therefore times both strategies on live traffic, per batch-size
bucket (`PipeliningChooser`), and keeps the faster; "on" and "off" force one.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from dspark_ray.engine.drafters.base import DraftProposal
from dspark_ray.engine.engine import SpeculativeEngine, record_rate
from dspark_ray.engine.governor import bucket_size
from dspark_ray.engine.sequence import Sequence, SequenceMark
from dspark_ray.engine.strategy_chooser import StrategyChooser

Pipelining = Literal["auto", "on", "off"]
TARGET_TIME_SMOOTHING = 0.5  # weight of the last step in the estimate of the target's time per step


@dataclass(frozen=True)
class MicroBatch:
    seqs: list[Sequence]
    proposal: DraftProposal  # rows in the order of seqs
    # The sequences as they were before a proposal of an earlier step drew from their generators:
    # undoing a failed step that verifies this batch takes them back to before the proposal.
    marks: dict[int, SequenceMark] = field(default_factory=dict)


class PipeliningChooser(StrategyChooser):
    """Pipelining on (True) or off (False), whichever commits more tokens per second."""


class PipelinedEngine(SpeculativeEngine):
    def __init__(self, *args, pipelining: Pipelining = "auto", time_boxed_drafting: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pipelining: Pipelining = pipelining
        self.time_boxed_drafting = time_boxed_drafting
        self.target_seconds: float | None = None  # smoothed: what the target's verification takes beside drafting
        # Mode "auto": a chooser per batch-size bucket (engine.governor's), since overlap pays at
        # some loads only (halving a small batch costs about what the overlap hides).
        self.choosers: dict[int, PipeliningChooser] = {}
        self.new_chooser = PipeliningChooser
        self._drafting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="propose")
        self._ready: MicroBatch | None = None  # proposed, waiting for the target
        self._unfreed: list[int] = []  # released sequences the workers still hold
        self.pipelined_governor = copy.deepcopy(self.governor)  # fresh: times pipelined steps only

    def _advance(self) -> None:
        chooser = self.chooser(min(self.max_batch_size, len(self.running) + len(self.waiting)))
        pipelined = chooser.next_mode() if self.pipelining == "auto" else self.pipelining == "on"
        before = {seq.seq_id: len(seq.output_token_ids) for seq in self.running}
        start = time.perf_counter()
        if not pipelined:
            self._ready = self._still_running(self._ready, [seq for seq in self.running if not seq.is_finished])
            self._free_now()
        if pipelined or self._ready is not None:  # switching off: first verify what is proposed
            self._pipelined_step(propose_next=pipelined)
        else:
            super()._advance()
        num_tokens = sum(len(seq.output_token_ids) - before.get(seq.seq_id, 0) for seq in self.running)
        chooser.record(pipelined, num_tokens, time.perf_counter() - start)

    def _mark_step(self) -> dict[int, SequenceMark]:
        marks = super()._mark_step()
        if self._ready is not None:
            marks.update((seq_id, mark) for seq_id, mark in self._ready.marks.items() if seq_id in marks)
        return marks

    def _undo(self, seqs: list[Sequence], marks: dict[int, SequenceMark], new: set[int]) -> None:
        """Also drop the proposal in flight (its draws are undone with the marks) and free now
        what the failed step may not have freed."""
        self._ready = None
        self._free_now()
        super()._undo(seqs, marks, new)

    def chooser(self, batch_size: int) -> PipeliningChooser:
        """The pipelining chooser of steps of `batch_size` sequences."""
        bucket = bucket_size(batch_size)
        if bucket not in self.choosers:
            self.choosers[bucket] = self.new_chooser()
        return self.choosers[bucket]

    def free(self, seq_ids: list[int]) -> None:
        """Deferred to the next step, where each worker frees them next to its own work (two
        Remove calls in a row, between steps, would keep both workers waiting); at once when no
        step follows."""
        self._unfreed.extend(seq_ids)
        if not self.has_unfinished():
            self._free_now()

    def _free_now(self) -> None:
        unfreed, self._unfreed = self._unfreed, []
        if unfreed:
            super().free(unfreed)

    def shutdown(self) -> None:
        self._drafting.shutdown(wait=True)

    def _pipelined_step(self, propose_next: bool) -> None:
        start = time.perf_counter()
        # nothing to draft meanwhile: prefill first
        admitted_first = self.admit() if all(seq.is_finished for seq in self.running) else []
        active = [seq for seq in self.running if not seq.is_finished]
        governed = propose_next and self.pipelined_governor is not None and bool(active)
        draft_limit = self.pipelined_governor.draft_limit(len(active)) if governed else None
        ready, upcoming = self._micro_batches(active, draft_limit, propose_next)
        unfreed = self._unfreed
        time_budget = self.target_seconds if self.time_boxed_drafting else None
        upcoming_marks = {seq.seq_id: seq.mark() for seq in upcoming}
        drafting = (self._drafting.submit(self._free_and_propose, unfreed, upcoming, draft_limit, time_budget)
                    if upcoming else None)
        try:  # the target frees, prefills new prompts and verifies while the drafter drafts
            target_start = time.perf_counter()
            if unfreed:
                self.verifier.remove(unfreed)
            admitted, target_features = self.prefill()
            output = self.verifier.verify(ready.seqs, ready.proposal) if ready is not None else None
            if drafting is not None and ready is not None and not admitted:  # a prefill is no verification
                self._observe_target(time.perf_counter() - target_start)
        finally:  # never leave a proposal running into the next step
            upcoming_proposal = drafting.result() if drafting is not None else None
        self._unfreed = []  # freed by both (a failed step frees them again: `_undo`)
        if drafting is None and unfreed:
            self.drafter.remove(unfreed)
        self.introduce(admitted, target_features)
        if ready is not None:
            before = sum(seq.num_tokens for seq in ready.seqs)
            self.commit(ready.seqs, ready.proposal, output)
            if governed and not admitted and not admitted_first:  # prefills are not timed (engine.governor)
                record_rate(self.pipelined_governor, len(active), draft_limit, ready.seqs, ready.proposal, before,
                            start)
        if upcoming:
            self._ready = MicroBatch(upcoming, upcoming_proposal, upcoming_marks)

    def _micro_batches(self, active: list[Sequence], draft_limit: int | None, propose_next: bool
                       ) -> tuple[MicroBatch | None, list[Sequence]]:
        """The micro-batch to verify now (proposed last step, or now on a cold start) and the
        sequences to propose for meanwhile."""
        ready, self._ready = self._still_running(self._ready, active), None
        if ready is None and active:  # cold start: the target waits for one proposal (all: undrafted)
            first = active if draft_limit == 0 else active[: (len(active) + 1) // 2]
            ready = MicroBatch(first, self.propose(first, draft_limit))
        if not propose_next or draft_limit == 0:
            return ready, []
        in_ready = {seq.seq_id for seq in ready.seqs} if ready is not None else set()
        return ready, [seq for seq in active if seq.seq_id not in in_ready][: (len(active) + 1) // 2]

    def _free_and_propose(self, unfreed: list[int], seqs: list[Sequence], draft_limit: int | None,
                          time_budget_s: float | None) -> DraftProposal:
        if unfreed:
            self.drafter.remove(unfreed)
        return self.propose(seqs, draft_limit, time_budget_s)

    def _observe_target(self, seconds: float) -> None:
        last = self.target_seconds
        self.target_seconds = seconds if last is None else last + TARGET_TIME_SMOOTHING * (seconds - last)

    @staticmethod
    def _still_running(batch: MicroBatch | None, active: list[Sequence]) -> MicroBatch | None:
        """The batch without sequences aborted or finished since it was proposed."""
        if batch is None:
            return None
        alive = {seq.seq_id for seq in active}
        rows = [row for row, seq in enumerate(batch.seqs) if seq.seq_id in alive]
        if not rows:
            return None
        if len(rows) == len(batch.seqs):
            return batch
        return MicroBatch([batch.seqs[row] for row in rows], batch.proposal.select(rows), batch.marks)
