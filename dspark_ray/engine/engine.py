"""The speculative decoding engine: one process, continuous batching, any drafter.

Each step: (1) admit waiting requests, (2) the drafter proposes up to `num_speculative_tokens`
tokens per running sequence, (3) the verifier scores the drafts of all running sequences in ONE
target forward (ragged lengths) and applies the lossless rule of `dspark_ray.core.verification`;
the same forward prefills the admitted prompts of up to the verifier's `fused_prompt_limit` tokens,
whose logits give their first tokens (a mixed batch; longer prompts, replays, and all with
`fused_prefill=False`, are prefilled in a forward of their own first; a replay draws no first
token, `Verifier.resume`), (4) stop rules append the
kept tokens, (5) target and drafter caches roll back to what was committed, finished sequences
leave.

The engine owns the authoritative per-sequence state. It knows token ids only; text enters
through the optional `decode` of the stop rules.

Fault isolation: a step that raises is undone (each sequence back to its marks, caches rolled back
to the committed tokens) and stepped again in halves, down to the sequences that fail alone. One
that still fails with the target alone (no drafts) finishes with `FinishReason.ERROR`; the others
advance as they would have: the same committed tokens, the same random draws. Only
`EngineUnavailable` fails a step as a whole.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque

from dspark_ray.engine.drafters.base import DraftProposal, Drafter, TargetFeatures
from dspark_ray.engine.faults import EngineUnavailable
from dspark_ray.engine.governor import DraftingPolicy
from dspark_ray.engine.sequence import FinishReason, GenerationRequest, Sequence, SequenceMark
from dspark_ray.engine.stopping import StopRules
from dspark_ray.engine.verifier import Verifier, VerifyOutput

logger = logging.getLogger(__name__)


class SpeculativeEngine:
    def __init__(self, verifier: Verifier, drafter: Drafter, stop_rules: StopRules,
                 num_speculative_tokens: int, max_batch_size: int = 32, governor: DraftingPolicy | None = None,
                 fused_prefill: bool = True) -> None:
        self.verifier = verifier
        self.governor = governor  # None: greedy sequences always draft
        self.drafter = drafter
        self.stop_rules = stop_rules
        self.num_speculative_tokens = num_speculative_tokens
        self.max_batch_size = max_batch_size
        self.fused_prefill = fused_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._next_seq_id = 0
        self._last_step_end: float | None = None  # set while unfinished sequences wait for the next step
        # sequences the drafter failed (a step failed with their drafts, not without): the target alone decodes them
        self.undrafted: set[int] = set()

    def add_request(self, request: GenerationRequest) -> Sequence:
        if not request.prompt_token_ids:
            raise ValueError("the prompt must hold at least one token")
        if request.max_tokens < 1:  # the prefill always emits one token
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if request.stop and self.stop_rules.decode is None:
            raise ValueError("stop strings need a tokenizer")
        if not 0 <= request.num_resumed_tokens < len(request.prompt_token_ids):
            raise ValueError(f"num_resumed_tokens must leave a prompt, got {request.num_resumed_tokens}")
        if len(request.prompt_token_ids) >= self.stop_rules.context_limit:
            raise ValueError(f"the prompt ({len(request.prompt_token_ids)} tokens) leaves no room in the "
                             f"context ({self.stop_rules.context_limit} tokens)")
        seq = Sequence.create(self._next_seq_id, request)
        self._next_seq_id += 1
        self.waiting.append(seq)
        return seq

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[Sequence]:
        """Advance every sequence by one verification; returns those that finished (failed ones
        with `FinishReason.ERROR`: module docstring)."""
        marks = self._mark_step()
        try:
            self._advance()
        except EngineUnavailable:
            raise
        except Exception as error:
            self._isolate(marks, error)
        return self.retire()

    def _advance(self) -> None:
        """One step of this engine's strategy, short of retiring finished sequences."""
        start = self._last_step_end or time.perf_counter()
        verified = list(self.running)
        self._advance_batch(verified, self._take_waiting(), start)

    def _advance_batch(self, verified: list[Sequence], admitted: list[Sequence], start: float | None) -> None:
        """Verify `verified` and prefill `admitted` (beside them where the verifier can); `start`
        None: the step is not timed for the governor."""
        limit = self.verifier.fused_prompt_limit
        fuses = [self.fused_prefill and bool(verified) and len(seq.request.prompt_token_ids) <= limit
                 and not seq.request.num_resumed_tokens for seq in admitted]  # a replay draws no first token
        fused = [seq for seq, fuse in zip(admitted, fuses) if fuse]
        apart = [seq for seq, fuse in zip(admitted, fuses) if not fuse]
        if apart:
            admission_start = time.perf_counter()
            self.introduce(apart, self._prefill_now(apart))
            if start is not None:
                start += time.perf_counter() - admission_start  # the governor's timing leaves prefills out
        if verified:
            self._verify_step(verified, fused, start)

    # --- fault isolation (module docstring) ---

    def _mark_step(self) -> dict[int, SequenceMark]:
        """Marks of every sequence a step may touch: the running ones and the waiting it may admit."""
        room = max(0, self.max_batch_size - len(self.running))
        return {seq.seq_id: seq.mark() for seq in itertools.chain(self.running, itertools.islice(self.waiting, room))}

    def _isolate(self, marks: dict[int, SequenceMark], error: Exception) -> None:
        """Undo the failed step, then step its sequences again in halves until the culprits are
        found (the admitted ones among them are prefilled in the retry)."""
        logger.warning("an engine step failed (%s: %s); isolating the sequences to blame",
                       type(error).__name__, error)
        seqs = [seq for seq in self.running if seq.seq_id in marks]
        new = {seq.seq_id for seq in seqs if marks[seq.seq_id].num_output_tokens == 0}  # admitted by the step
        self._undo(seqs, marks, new)
        self._bisect(seqs, new, error)

    def _bisect(self, seqs: list[Sequence], new: set[int], error: Exception) -> None:
        """`seqs` failed a step together (undone): retry each half alone, down to single culprits."""
        if len(seqs) == 1:
            self._settle(seqs[0], new, error)
            return
        for half in _halves(seqs):
            self._retry(half, new)

    def _retry(self, seqs: list[Sequence], new: set[int]) -> None:
        """Step `seqs` alone; if that fails, undo it and bisect."""
        marks = {seq.seq_id: seq.mark() for seq in seqs}
        try:
            self._advance_batch([seq for seq in seqs if seq.seq_id not in new],
                                [seq for seq in seqs if seq.seq_id in new], None)
        except EngineUnavailable:
            raise
        except Exception as error:
            self._undo(seqs, marks, new)
            self._bisect(seqs, new, error)
            return
        new.difference_update(seq.seq_id for seq in seqs)

    def _settle(self, seq: Sequence, new: set[int], error: Exception) -> None:
        """`seq` fails a step alone: once more with the target alone (a drafter fault leaves the
        output to the target, DESIGN's rule), then it finishes with an error."""
        if seq.seq_id not in self.undrafted:
            self.undrafted.add(seq.seq_id)
            logger.warning("sequence %d goes on without drafts after a failed step", seq.seq_id)
            self._retry([seq], new)
            return
        logger.error("sequence %d failed a step alone", seq.seq_id, exc_info=error)
        seq.finish_reason = FinishReason.ERROR
        seq.error = f"engine step failed: {type(error).__name__}: {error}"

    def _undo(self, seqs: list[Sequence], marks: dict[int, SequenceMark], new: set[int]) -> None:
        """Put `seqs` back to `marks`: new ones leave the verifier and the drafter, the others'
        caches roll back to their committed tokens. A drafter that fails here is given up for
        them (the target alone decodes them)."""
        for seq in seqs:
            seq.restore(marks[seq.seq_id])
        # now, even where a step strategy defers freeing: the retry prefills them again
        SpeculativeEngine.free(self, [seq.seq_id for seq in seqs if seq.seq_id in new])
        held = [seq for seq in seqs if seq.seq_id not in new]
        self.verifier.sync(held)
        drafted = self._drafted(held)
        try:
            self.drafter.on_verified(drafted, [0] * len(drafted), [0] * len(drafted), None)
        except Exception:
            logger.exception("the drafter failed to roll back; its sequences go on without drafts")
            self.undrafted.update(seq.seq_id for seq in drafted)

    def _drafted(self, seqs: list[Sequence]) -> list[Sequence]:
        return [seq for seq in seqs if seq.seq_id not in self.undrafted] if self.undrafted else seqs

    def _verify_step(self, seqs: list[Sequence], admitted: list[Sequence], start: float | None) -> None:
        """Draft as far as the governor says (not at all, a short or the full length), verify, and
        prefill `admitted` in the same forward. The governor is told the rate of steps that
        prefilled nothing: a prefill costs the same in either mode, and one landing in a block
        would decide its verdict. Timed from the end of the last step, so what happens between
        steps counts too (a server streaming deltas: a mode whose long steps keep new requests
        waiting shows it in fewer tokens per second), less the prefill of an unfused admission
        (`start` is moved past it). Not recorded either: drafting steps that drafted nothing (a
        drafter that is down says nothing about drafting)."""
        draft_limit = None if self.governor is None else self.governor.draft_limit(len(seqs))
        before = sum(seq.num_tokens for seq in seqs)
        proposal = self.propose(seqs, draft_limit)
        output, added = self.verifier.verify_and_add(seqs, proposal, admitted)
        if admitted:
            self.welcome(admitted, added)
        self.commit(seqs, proposal, output)
        if self.governor is not None and not admitted and start is not None:
            record_rate(self.governor, len(seqs), draft_limit, seqs, proposal, before, start)

    def generate(self, requests: list[GenerationRequest]) -> list[Sequence]:
        seqs = [self.add_request(request) for request in requests]
        while self.has_unfinished():
            self.step()
        return seqs

    def abort(self, seq_ids: list[int]) -> None:
        gone = set(seq_ids)
        self.waiting = deque(seq for seq in self.waiting if seq.seq_id not in gone)
        self._release([seq for seq in self.running if seq.seq_id in gone])
        if not self.has_unfinished():  # idle until the next request: no step is running
            self._last_step_end = None

    # The phases of a step are public so a step strategy (the serving layer's pipelined engine)
    # can interleave them across micro-batches without copying the commit and stop logic.

    def admit(self) -> list[Sequence]:
        """Prefill waiting prompts; the target's next-token distribution gives their first token."""
        admitted, target_features = self.prefill()
        self.introduce(admitted, target_features)
        return admitted

    def prefill(self) -> tuple[list[Sequence], TargetFeatures | None]:
        """The target's half of admitting: prompts in, first tokens out. `introduce` must follow
        before the admitted sequences draft."""
        admitted = self._take_waiting()
        if not admitted:
            return [], None
        return admitted, self._prefill_now(admitted)

    def _prefill_now(self, admitted: list[Sequence]) -> TargetFeatures | None:
        """Prefill in a forward of their own, replays without a first token (`Verifier.resume`);
        their captured target layers (DSpark) or None."""
        resumed = [seq for seq in admitted if seq.request.num_resumed_tokens]
        fresh = [seq for seq in admitted if not seq.request.num_resumed_tokens]
        features = self.verifier.resume(resumed) if resumed else None
        if fresh:
            output = self.verifier.add(fresh)
            self._append_first_tokens(fresh, output)
            features = _merged(features, output.target_features)
        return features

    def welcome(self, admitted: list[Sequence], output: VerifyOutput) -> None:
        """Both halves of admitting, after a forward that prefilled `admitted` (`output`)."""
        self._append_first_tokens(admitted, output)
        self.introduce(admitted, output.target_features)

    def _take_waiting(self) -> list[Sequence]:
        """Move as many waiting requests into the batch as it has room for."""
        room = self.max_batch_size - len(self.running)
        admitted = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        self.running.extend(admitted)
        return admitted

    def _append_first_tokens(self, admitted: list[Sequence], output: VerifyOutput) -> None:
        for row, seq in enumerate(admitted):  # the prefill's token is no verification step: no stats
            self.stop_rules.append(seq, output.result.tokens(row))

    def introduce(self, admitted: list[Sequence], target_features: TargetFeatures | None) -> None:
        """The drafter's half of admitting."""
        if admitted:
            self.drafter.add(self._drafted([seq for seq in admitted if not seq.is_finished]), target_features)

    def propose(self, seqs: list[Sequence], draft_limit: int | None = None, time_budget_s: float | None = None
                ) -> DraftProposal:
        """Drafts for `seqs`, at most `draft_limit` per greedy sequence (0: drafts for sampled
        sequences only; see engine.governor), within `time_budget_s` where the drafter can stop
        early (`Drafter.propose`)."""
        budgets = [self._draft_budget(seq, draft_limit if seq.request.sampling.is_greedy else None)
                   for seq in seqs]
        if not any(budgets):
            return DraftProposal.empty(len(seqs))
        if not self.undrafted:
            return self.drafter.propose(seqs, budgets, time_budget_s)
        rows = [row for row, seq in enumerate(seqs) if seq.seq_id not in self.undrafted]
        proposal = self.drafter.propose([seqs[row] for row in rows], [budgets[row] for row in rows], time_budget_s)
        return proposal.scatter(rows, len(seqs))

    def commit(self, seqs: list[Sequence], proposal: DraftProposal, output: VerifyOutput) -> None:
        """Append what the verifier kept (stop rules apply), then bring target and drafter in line."""
        result = output.result
        num_drafted, num_accepted = proposal.num_draft_tokens.tolist(), result.num_accepted.tolist()
        for row, seq in enumerate(seqs):
            seq.stats.record(num_drafted[row], num_accepted[row])
            self.stop_rules.append(seq, result.tokens(row))
        self.verifier.sync(seqs)
        if self.undrafted:
            rows = [row for row, seq in enumerate(seqs) if seq.seq_id not in self.undrafted]
            seqs, num_drafted, num_accepted = ([seqs[row] for row in rows], [num_drafted[row] for row in rows],
                                               [num_accepted[row] for row in rows])
        if seqs:
            self.drafter.on_verified(seqs, num_drafted, num_accepted, output.target_features)

    def _draft_budget(self, seq: Sequence, limit: int | None) -> int:
        if seq.seq_id in self.undrafted:
            return 0
        # Each step emits up to budget + 1 tokens and the target scores positions up to
        # num_tokens - 1 + budget, so neither max_tokens nor the context limit is overrun.
        room_in_context = self.stop_rules.context_limit - seq.num_tokens - 1
        most = self.num_speculative_tokens if limit is None else min(limit, self.num_speculative_tokens)
        return max(0, min(most, seq.remaining_tokens - 1, room_in_context))

    def retire(self) -> list[Sequence]:
        """Release finished sequences: the end of a step."""
        finished = [seq for seq in self.running if seq.is_finished]
        self._release(finished)
        self._last_step_end = time.perf_counter() if self.has_unfinished() else None
        return finished

    def _release(self, seqs: list[Sequence]) -> None:
        if not seqs:
            return
        seq_ids = [seq.seq_id for seq in seqs]
        gone = set(seq_ids)
        self.running = [seq for seq in self.running if seq.seq_id not in gone]
        self.undrafted.difference_update(gone)
        self.free(seq_ids)

    def free(self, seq_ids: list[int]) -> None:
        """Drop released sequences' caches in the verifier and the drafter (a step strategy may
        defer this to overlap it with other work)."""
        self.verifier.remove(seq_ids)
        self.drafter.remove(seq_ids)


def record_rate(governor: DraftingPolicy, batch_size: int, draft_limit: int | None, verified: list[Sequence],
                proposal: DraftProposal, num_tokens_before: int, start: float) -> None:
    """Tell a governor the tokens `verified` gained since `start`, unless the step meant to draft and
    drafted nothing (a drafter that is down says nothing about drafting)."""
    if draft_limit == 0 or bool(proposal.num_draft_tokens.any()):
        governor.record(batch_size, draft_limit, sum(seq.num_tokens for seq in verified) - num_tokens_before,
                        time.perf_counter() - start)


def _merged(features: TargetFeatures | None, more: TargetFeatures | None) -> TargetFeatures | None:
    return more if features is None else features if more is None else {**features, **more}


def _halves(seqs: list[Sequence]) -> list[list[Sequence]]:
    middle = (len(seqs) + 1) // 2
    return [seqs[:middle], seqs[middle:]]
