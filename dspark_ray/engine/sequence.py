"""Per-sequence state owned by the engine: tokens, sampling settings, RNG, stop rules, stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import torch

from dspark_ray.core.sampling import SamplingParams, make_generator


class FinishReason(str, Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ERROR = "error"  # a step failed because of this sequence (`SpeculativeEngine.step`); `Sequence.error` says why


@dataclass
class SequenceStats:
    num_steps: int = 0  # verification steps this sequence took part in
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_per_position: list[int] = field(default_factory=list)

    @property
    def mean_acceptance_length(self) -> float:
        """Accepted draft tokens + 1 per step (vLLM's convention)."""
        return 1.0 + self.num_accepted_tokens / self.num_steps if self.num_steps else 0.0

    def copy(self) -> SequenceStats:
        return SequenceStats(self.num_steps, self.num_draft_tokens, self.num_accepted_tokens,
                             list(self.num_accepted_per_position))

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_steps += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        missing = num_accepted - len(self.num_accepted_per_position)
        self.num_accepted_per_position.extend([0] * max(0, missing))
        for position in range(num_accepted):
            self.num_accepted_per_position[position] += 1


@dataclass(frozen=True)
class GenerationRequest:
    prompt_token_ids: list[int]
    sampling: SamplingParams = SamplingParams()
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # A replay after a crash: the last n prompt tokens are the completion an earlier run emitted.
    # Stop strings and text see them as output; max_tokens counts only the tokens still to come.
    num_resumed_tokens: int = 0


@dataclass(eq=False)  # identity, not field-by-field comparison of token lists
class Sequence:
    seq_id: int
    request: GenerationRequest
    generator: torch.Generator
    output_token_ids: list[int] = field(default_factory=list)
    stats: SequenceStats = field(default_factory=SequenceStats)
    finish_reason: FinishReason | None = None
    stop_text_end: int | None = None  # completion text is cut here when a stop string matched
    error: str | None = None  # why the sequence finished with FinishReason.ERROR

    @classmethod
    def create(cls, seq_id: int, request: GenerationRequest) -> "Sequence":
        return cls(seq_id, request, make_generator(request.sampling.seed))

    @property
    def token_ids(self) -> list[int]:
        return self.request.prompt_token_ids + self.output_token_ids

    @property
    def completion_token_ids(self) -> list[int]:
        """The completion a client sees: the replayed tokens of a resumed request, then the output."""
        resumed = self.request.num_resumed_tokens
        prompt = self.request.prompt_token_ids
        return (prompt[len(prompt) - resumed:] if resumed else []) + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining_tokens(self) -> int:
        return self.request.max_tokens - len(self.output_token_ids)

    def mark(self) -> SequenceMark:
        """What a step may change here, to `restore` if the step fails: counters, no caches."""
        generator_state = None if self.request.sampling.is_greedy else self.generator.get_state()
        return SequenceMark(len(self.output_token_ids), self.finish_reason, self.stop_text_end, self.stats.copy(),
                            generator_state)

    def restore(self, mark: SequenceMark) -> None:
        """Back to `mark` (a step only appends tokens: see `StopRules.append`)."""
        del self.output_token_ids[mark.num_output_tokens:]
        self.finish_reason, self.stop_text_end = mark.finish_reason, mark.stop_text_end
        self.stats = mark.stats.copy()
        if mark.generator_state is not None:
            self.generator.set_state(mark.generator_state)


class SequenceMark(NamedTuple):  # taken every step: a tuple is the cheapest record
    num_output_tokens: int
    finish_reason: FinishReason | None
    stop_text_end: int | None
    stats: SequenceStats
    generator_state: torch.Tensor | None  # sampled sequences only: greedy ones draw nothing
