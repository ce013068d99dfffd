"""What the target did with a drafter's drafts, step by step: the raw material of `calibrate` and
`eval`.

`run_recorded` decodes requests with an engine whose drafter is wrapped by an
`AcceptanceRecorder`: for every verification step of every sequence it keeps how many drafts
were verified, how many the target accepted, the drafter's confidence logits for the verified
drafts (DSpark) and the time spent proposing. The engine and its verification are untouched, so
outputs stay those of the target alone.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from dspark_ray.core.calibration import AcceptanceRecords
from dspark_ray.engine.drafters.base import DraftProposal, Drafter, TargetFeatures
from dspark_ray.engine.engine import SpeculativeEngine
from dspark_ray.engine.sequence import GenerationRequest, Sequence


@dataclass(frozen=True)
class StepRecord:
    seq_id: int
    num_drafted: int  # drafts sent to the target
    num_accepted: int
    confidence_logits: list[float] | None  # of the verified drafts, when the drafter has a confidence head


class AcceptanceRecorder:
    """A drafter wrapper that records each verification step (see the module docstring)."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        self.steps: list[StepRecord] = []
        self.draft_seconds = 0.0
        self.num_proposals = 0
        self._proposal: DraftProposal | None = None

    def add(self, seqs: list[Sequence], target_features: TargetFeatures | None = None) -> None:
        self.drafter.add(seqs, target_features)

    def remove(self, seq_ids: list[int]) -> None:
        self.drafter.remove(seq_ids)

    def propose(self, seqs: list[Sequence], max_draft_tokens: list[int], time_budget_s: float | None = None
                ) -> DraftProposal:
        start = time.perf_counter()
        self._proposal = self.drafter.propose(seqs, max_draft_tokens, time_budget_s)
        self.draft_seconds += time.perf_counter() - start
        self.num_proposals += 1
        return self._proposal

    def on_verified(self, seqs: list[Sequence], num_drafted: list[int], num_accepted: list[int],
                    target_features: TargetFeatures | None = None) -> None:
        logits = self._proposal.confidence_logits if self._proposal is not None else None
        for row, seq in enumerate(seqs):
            confidence = None if logits is None else logits[row, : num_drafted[row]].tolist()
            self.steps.append(StepRecord(seq.seq_id, num_drafted[row], num_accepted[row], confidence))
        self.drafter.on_verified(seqs, num_drafted, num_accepted, target_features)


@dataclass(frozen=True)
class RunOutcome:
    outputs: list[list[int]]  # generated token ids per request, in request order
    seq_ids: list[int]  # engine ids of the requests, in request order
    seconds: float  # wall time of the whole generation (no model loading)
    steps: list[StepRecord]
    draft_seconds: float  # inside the drafter's propose
    num_proposals: int  # propose calls (one per engine step that verified anything)

    @property
    def num_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.outputs)


def run_recorded(engine: SpeculativeEngine, requests: list[GenerationRequest], progress: str | None = None) -> RunOutcome:
    """Decode `requests` together (continuous batching up to the engine's batch size), recording;
    `progress` names a progress bar on stderr (none when None)."""
    recorder = AcceptanceRecorder(engine.drafter)
    engine.drafter = recorder
    try:
        seqs = [engine.add_request(request) for request in requests]
        with tqdm(total=len(seqs), desc=progress, unit="seq", file=sys.stderr, disable=progress is None,
                  leave=False) as bar:
            start = time.perf_counter()
            while engine.has_unfinished():
                bar.update(len(engine.step()))
            seconds = time.perf_counter() - start
    finally:
        engine.drafter = recorder.drafter
    return RunOutcome([seq.output_token_ids for seq in seqs], [seq.seq_id for seq in seqs], seconds,
                      recorder.steps, recorder.draft_seconds, recorder.num_proposals)


def acceptance_records(steps: list[StepRecord]) -> AcceptanceRecords:
    """The steps that verified drafts with confidence logits, for calibration."""
    kept = [step for step in steps if step.confidence_logits is not None and step.num_drafted > 0]
    return AcceptanceRecords.from_steps([step.confidence_logits for step in kept], [step.num_accepted for step in kept])


@dataclass(frozen=True)
class AcceptanceSummary:
    num_steps: int  # verification steps (sequence x step), drafts or not
    num_draft_tokens: int
    num_accepted_tokens: int
    mean_acceptance_length: float  # (accepted + 1) per step, vLLM's convention
    mean_draft_tokens: float  # verified drafts per step
    drafted_per_position: list[int]  # steps that verified a draft at position k (1-based k = index + 1)
    survival_per_position: list[float]  # P(drafts 1..k all accepted | draft k verified)
    conditional_per_position: list[float]  # P(draft k accepted | drafts 1..k-1 accepted, draft k verified)


def summarize(steps: list[StepRecord]) -> AcceptanceSummary:
    width = max((step.num_drafted for step in steps), default=0)
    drafted = [sum(step.num_drafted > k for step in steps) for k in range(width)]
    survived = [sum(step.num_drafted > k and step.num_accepted > k for step in steps) for k in range(width)]
    reached = [sum(step.num_drafted > k and step.num_accepted >= k for step in steps) for k in range(width)]
    num_steps = len(steps)
    num_draft, num_accepted = sum(s.num_drafted for s in steps), sum(s.num_accepted for s in steps)
    return AcceptanceSummary(
        num_steps=num_steps, num_draft_tokens=num_draft, num_accepted_tokens=num_accepted,
        mean_acceptance_length=1.0 + num_accepted / num_steps if num_steps else 0.0,
        mean_draft_tokens=num_draft / num_steps if num_steps else 0.0,
        drafted_per_position=drafted,
        survival_per_position=[s / d if d else 0.0 for s, d in zip(survived, drafted)],
        conditional_per_position=[s / r if r else 0.0 for s, r in zip(survived, reached)],
    )
