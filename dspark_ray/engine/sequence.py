"""Per-sequence state owned by the engine: tokens, sampling settings, RNG, stop rules, stats.

RNG: every draw a sequence makes in a step (its drafts, the acceptance tests, the recovered or
bonus token) comes from `Sequence.generator`, seeded from the request's seed and the number of
committed tokens when the step first draws (`core.sampling.counter_seed`). The committed count
grows every step, so each step draws a fresh stream; and a sequence rebuilt from its committed
tokens (a replay after a crash, a step undone and retried) draws exactly what the original drew,
without any generator state being kept or sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import torch

from dspark_ray.core.sampling import SamplingParams, counter_seed, random_seed


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
    # The replay draws no first token: its last committed token is the input of its first step,
    # as in the run it continues (`Verifier.resume`).
    num_resumed_tokens: int = 0


@dataclass(eq=False)  # identity, not field-by-field comparison of token lists
class Sequence:
    seq_id: int
    request: GenerationRequest
    seed: int  # every step's draws derive from it (module docstring)
    output_token_ids: list[int] = field(default_factory=list)
    stats: SequenceStats = field(default_factory=SequenceStats)
    finish_reason: FinishReason | None = None
    stop_text_end: int | None = None  # completion text is cut here when a stop string matched
    error: str | None = None  # why the sequence finished with FinishReason.ERROR
    _generator: torch.Generator = field(default_factory=torch.Generator, repr=False)
    _generator_counter: int | None = None  # the committed count `_generator` was seeded for

    @classmethod
    def create(cls, seq_id: int, request: GenerationRequest) -> "Sequence":
        seed = request.sampling.seed
        return cls(seq_id, request, random_seed() if seed is None else seed)

    @property
    def generator(self) -> torch.Generator:
        """This step's draws, in order: seeded from (seed, committed tokens) the first time it is
        asked for after the committed tokens change (module docstring). Greedy sequences draw
        nothing: theirs is never reseeded."""
        if self._generator_counter != self.num_tokens and not self.request.sampling.is_greedy:
            self._generator.manual_seed(counter_seed(self.seed, self.num_tokens))
            self._generator_counter = self.num_tokens
        return self._generator

    def reseed(self, seed: int) -> None:
        """Draw from `seed` from now on (a worker's copy: each command brings the seed of its draws)."""
        self.seed, self._generator_counter = seed, None

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
        return SequenceMark(len(self.output_token_ids), self.finish_reason, self.stop_text_end, self.stats.copy())

    def restore(self, mark: SequenceMark) -> None:
        """Back to `mark` (a step only appends tokens: see `StopRules.append`); the retried step
        draws again what the failed one drew."""
        del self.output_token_ids[mark.num_output_tokens:]
        self.finish_reason, self.stop_text_end = mark.finish_reason, mark.stop_text_end
        self.stats = mark.stats.copy()
        self._generator_counter = None


class SequenceMark(NamedTuple):  # taken every step: a tuple is the cheapest record
    num_output_tokens: int
    finish_reason: FinishReason | None
    stop_text_end: int | None
    stats: SequenceStats
